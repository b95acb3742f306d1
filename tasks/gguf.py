"""GGUF export through llama.cpp's own converter (convert_hf_to_gguf.py), never our own.

The converter is not on PyPI as a package; it ships, with the gguf-py it is written against,
in the source distribution of llama-cpp-python. `make gguf-converter` downloads that pinned
sdist (hash-checked) and unpacks the converter into CONVERTER_DIR. export runs it in a
subprocess on the merged model, then loads the file back with transformers (which reads GGUF
through the `gguf` package) so the caller can re-score it.

One adaptation, and only where the converter would refuse: it names a BPE tokenizer's
pre-tokenizer by a hash of known models' vocabularies, so a tokenizer trained for a project
(like the smoke model's) is "not recognized" even when its pre-tokenization is exactly
GPT-2's byte-level rule. Then, and only when tokenizer.json is that rule with no normalizer,
this module answers "gpt-2" (llama.cpp's name for it); any other tokenizer still fails. The
re-scoring after loading the file back, with the token ids compared, is the check.

    python -m tasks.gguf CONVERTER_DIR MODEL_DIR --outtype f32 --outfile model.gguf
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tasks.errors import PipelineError

# Where `make gguf-converter` unpacks it: inside the virtual environment that runs us.
CONVERTER_DIR = Path(sys.prefix) / "llama.cpp"
CONVERTER = "convert_hf_to_gguf.py"
SOURCE = "SOURCE"  # the pinned sdist (name==version --hash) the converter was unpacked from
# The Hugging Face model types transformers can load back from GGUF (and so re-score).
LOADABLE = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "starcoder2")


def file_name(outtype: str) -> str:
    return f"model-{outtype}.gguf"


def _plain_gpt2_byte_level(model_dir: Path) -> bool:
    tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    pre = tok.get("pre_tokenizer") or {}
    return (tok.get("model", {}).get("type") == "BPE" and tok.get("normalizer") is None
            and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) is True
            and pre.get("add_prefix_space", False) is False)


def convert(model_dir: Path, out_file: Path, outtype: str, converter_dir: Path = CONVERTER_DIR) -> None:
    """Writes `out_file` from the Hugging Face checkpoint in `model_dir`."""
    if not (converter_dir / CONVERTER).is_file():
        raise PipelineError(f"export.gguf: llama.cpp's converter is not in {converter_dir}/: run "
                            "`make gguf-converter` (downloads the pinned llama-cpp-python sdist)")
    proc = subprocess.run([sys.executable, "-m", "tasks.gguf", str(converter_dir), str(model_dir),
                           "--outtype", outtype, "--outfile", str(out_file)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise PipelineError(f"export.gguf: llama.cpp's converter failed on {model_dir}: {last}")


def source(converter_dir: Path = CONVERTER_DIR) -> str:
    """Which llama.cpp the converter comes from, for the export's provenance."""
    path = converter_dir / SOURCE
    return path.read_text().strip() if path.is_file() else "unknown"


def load(model_dir: Path, gguf_file: str):
    """The model and tokenizer read back from the GGUF file (dequantized by transformers)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_file, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_file)


def main() -> None:
    converter_dir = Path(sys.argv.pop(1)).resolve()
    sys.path.insert(0, str(converter_dir))
    import convert_hf_to_gguf  # puts its own gguf-py first on sys.path
    from conversion.base import TextModel

    recognized = TextModel.get_vocab_base_pre

    def vocab_base_pre(self, tokenizer) -> str:
        try:
            return recognized(self, tokenizer)
        except NotImplementedError:
            if not _plain_gpt2_byte_level(Path(self.dir_model)):
                raise
            convert_hf_to_gguf.logger.warning("BPE vocabulary not in llama.cpp's list; its "
                                              "pre-tokenizer is GPT-2's byte-level rule: 'gpt-2'")
            return "gpt-2"

    TextModel.get_vocab_base_pre = vocab_base_pre
    sys.argv[0] = str(converter_dir / CONVERTER)
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
