"""Every PEFT method of `peft.method`: train (2 steps), evaluate and export run on the tiny
model, and what export wrote loads back and generates: a standalone model for the methods
that merge, the adapter on its base for soft prompts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tasks import evaluate, export, train
from tasks.config import PROMPT_LEARNING, UNQUANTIZED_ONLY, parse_params

from .conftest import TINY_PARAMS, merge, shipped_params, tokenized_dir

METHODS = ("lora", "dora", "adalora", "loha", "lokr", "ia3", *PROMPT_LEARNING)
STEPS = 2


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model):
    """The tiny model and the sample data, prepared and tokenized once for every method."""
    return tokenized_dir(tmp_path_factory.mktemp("methods"), tiny_model,
                         merge(shipped_params(), TINY_PARAMS))


def method_params(method: str) -> dict:
    over: dict = {"peft": {"method": method}, "train": {"max_steps": STEPS, "save_steps": STEPS},
                  "evaluate": {"max_samples": 2, "max_new_tokens": 4}, "export": {"check_prompts": 1}}
    if method in UNQUANTIZED_ONLY:
        over.update(quant={"load_in_4bit": False}, export={"check_prompts": 1, "merge_into": "original"})
    if method in PROMPT_LEARNING:
        over["train"]["padding_free"] = False
    if method == "prefix_tuning":
        over["train"]["gradient_checkpointing"] = False
    if method == "adalora":
        over["lora"] = {"r": 4, "lora_alpha": 8}
        over["peft"]["adalora_target_r"] = 2
    return merge(merge(shipped_params(), TINY_PARAMS), over)


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_evaluates_exports_and_loads_back(method, prepared, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ws = tmp_path / "ws"
    shutil.copytree(prepared, ws)
    monkeypatch.chdir(ws)
    raw = method_params(method)
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    params = parse_params(raw, "params.yaml")

    metrics = train.run(params)
    assert metrics["steps"] == STEPS and metrics["trainable_params"] > 0
    config = json.loads(Path("artifacts/adapter/adapter_config.json").read_text())
    assert config["peft_type"].lower().replace("_", "") == {
        "dora": "lora", "p_tuning": "ptuning", "prompt_tuning": "prompttuning",
        "prefix_tuning": "prefixtuning"}.get(method, method).replace("_", "")
    assert config.get("use_dora", False) == (method == "dora")

    scores = evaluate.run(params)
    assert set(scores) == {"base", "tuned", "delta"}

    exported = export.run(params)
    merged = Path("artifacts/merged")
    manifest = json.loads((merged / "manifest.json").read_text())
    assert manifest["params"]["peft"]["method"] == method
    tok = AutoTokenizer.from_pretrained(merged)
    ids = tok("Summarize:", return_tensors="pt")
    if method in PROMPT_LEARNING:
        from peft import AutoPeftModelForCausalLM

        assert exported["merged"] is False and manifest["merged"] is False
        assert "Not a standalone model" in (merged / "README.md").read_text()
        model = AutoPeftModelForCausalLM.from_pretrained(merged)
    else:
        assert exported["merged"] is True and exported["logits_max_abs_diff"] <= 1e-3
        assert not (merged / "adapter_config.json").exists()
        model = AutoModelForCausalLM.from_pretrained(merged)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3


@pytest.mark.parametrize(("over", "needle"), [
    ({"peft": {"method": "loha"}}, "peft.method loha has no 4-bit"),
    ({"peft": {"method": "prefix_tuning"}, "train": {"padding_free": True}},
     "set train.padding_free: false"),
    ({"peft": {"method": "prefix_tuning"}}, "train.gradient_checkpointing: false"),
    ({"peft": {"method": "adalora"}, "train": {"max_steps": -1}}, "positive train.max_steps"),
    ({"peft": {"method": "adalora", "adalora_target_r": 64}}, "must not exceed lora.r"),
])
def test_method_combinations_that_cannot_work_are_refused(over, needle):
    from tasks.errors import ConfigError

    with pytest.raises(ConfigError, match=needle):
        parse_params(merge(shipped_params(), over), "params.yaml")
