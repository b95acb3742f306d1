"""export.gguf: llama.cpp's own converter writes the merged model as GGUF, transformers reads
it back, and export re-scores it; what cannot be converted or checked is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tasks import gguf, gguf_import
from tasks.config import parse_params
from tasks.errors import ConfigError, PipelineError

from .conftest import TASK_PARAMS, TINY_PARAMS, copy_workspace, finetune, merge, shipped_params, stage

pytestmark = pytest.mark.skipif(
    not (gguf.CONVERTER_DIR / gguf.CONVERTER).is_file(),
    reason="llama.cpp's converter is not unpacked (make test runs `make gguf-converter`)")

GGUF = merge(merge(shipped_params(), TINY_PARAMS),
             {"export": {"gguf": "f16", "check_prompts": 2}, "evaluate": {"max_samples": 4}})


def test_export_writes_gguf_that_reads_back_with_the_same_tokens_logits_and_score(
        tmp_path, trained_workspace, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The session's adapter was trained with GGUF's train settings (TINY_PARAMS'): only
    # export runs again, now with export.gguf.
    ws = copy_workspace(trained_workspace, tmp_path / "ws")
    trained_with = yaml.safe_load((ws / "params.yaml").read_text())
    assert all(trained_with[key] == GGUF[key] for key in GGUF if key not in ("export", "evaluate"))
    monkeypatch.chdir(ws)
    params = parse_params(GGUF, "params.yaml")
    metrics = stage("export", params)

    merged = Path("artifacts/merged")
    assert metrics["gguf"]["file"] == "model-f16.gguf" == gguf.file_name("f16")
    assert metrics["gguf"]["converter"].startswith("llama-cpp-python==")
    assert (merged / "model-f16.gguf").stat().st_size == metrics["gguf"]["bytes"] > 0
    assert abs(metrics["scores"]["gguf"] - metrics["scores"]["merged"]) <= params.export.metric_atol
    assert json.loads(Path("metrics/export.json").read_text())["gguf"] == metrics["gguf"]
    assert "`model-f16.gguf` (GGUF, read back by transformers)" in (merged / "README.md").read_text()

    # Independently of export: the file is a model transformers runs like the safetensors one.
    reference = AutoModelForCausalLM.from_pretrained(merged).eval()
    model = AutoModelForCausalLM.from_pretrained(merged, gguf_file="model-f16.gguf").eval()
    tok, gguf_tok = (AutoTokenizer.from_pretrained(merged),
                     AutoTokenizer.from_pretrained(merged, gguf_file="model-f16.gguf"))
    text = "Summarize the following conversation.\n\nAna: see you at 5?\n\nSummary:"
    assert gguf_tok(text).input_ids == tok(text).input_ids
    ids = torch.tensor([tok(text).input_ids])
    with torch.no_grad():
        diff = (reference(ids).logits - model(ids).logits).abs().max().item()
    assert diff < 1e-2  # f16 rounding of weights trained in fp32

    # And back: `finetune import-gguf` makes the GGUF a model folder the pipeline trains.
    out = Path("models/reimported")
    assert finetune(ws, "import-gguf", str(merged / "model-f16.gguf"), "--out", str(out)).returncode == 0
    provenance = json.loads((out / gguf_import.PROVENANCE).read_text())
    assert provenance["gguf"]["sha256"] == gguf_import._sha256(merged / "model-f16.gguf")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    imported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == tok(text).input_ids
    with torch.no_grad():
        assert torch.equal(imported(ids).logits, model(ids).logits)
    again = finetune(ws, "import-gguf", str(merged / "model-f16.gguf"), "--out", str(out))
    assert again.stdout.strip().endswith("already there and intact")
    (out / "tokenizer_config.json").write_text("{}")
    assert gguf_import.problem(out) == f"{out / 'tokenizer_config.json'} differs from what was converted (sha256 changed)"
    not_ours = finetune(ws, "import-gguf", str(merged / "model-f16.gguf"), "--out", "models")
    assert not_ours.returncode != 0 and "not written by finetune import-gguf" in not_ours.stderr


def test_a_tokenizer_llama_cpp_does_not_know_is_still_refused(tmp_path, tiny_model):
    """The only adaptation (GPT-2 byte-level BPE) must not let other tokenizers through."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model, model_dir)
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Whitespace"}
    (model_dir / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(PipelineError, match="llama.cpp's converter failed on .*pre-tokenizer"):
        gguf.convert(model_dir, tmp_path / "x.gguf", "f32")
    assert not (tmp_path / "x.gguf").exists()


def test_missing_converter_says_how_to_get_it(tmp_path, tiny_model):
    with pytest.raises(PipelineError, match="make gguf-converter"):
        gguf.convert(tiny_model, tmp_path / "x.gguf", "f32", converter_dir=tmp_path)


@pytest.mark.parametrize("over", [TASK_PARAMS["seq2seq"], {"peft": {"method": "prompt_tuning"}}])
def test_gguf_is_refused_where_there_is_no_standalone_decoder(over):
    with pytest.raises(ConfigError, match="export.gguf needs model.task causal_lm"):
        parse_params(merge(merge(shipped_params(), over), {"export": {"gguf": "f32"}}), "params.yaml")


@pytest.mark.parametrize("content", [b"not a gguf file at all", b"GGUF\x03\x00\x00\x00"])
def test_import_gguf_refuses_a_file_that_is_not_one_in_a_line(tmp_path, content):
    (tmp_path / "bad.gguf").write_bytes(content)
    result = finetune(tmp_path, "import-gguf", "bad.gguf", "--out", "models/bad")
    assert result.returncode == 2
    assert result.stderr.startswith("finetune import-gguf: error: bad.gguf: transformers cannot read this "
                                    "GGUF file: ") and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "models").exists()
