"""align (DPO): off by default, where it only records that; on, it runs TRL's DPO from the
SFT adapter for a few steps, writes held-out reward metrics and an adapter that loads back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tasks import align, train
from tasks.config import parse_params
from tasks.errors import DataError

from .conftest import REPO, TINY_PARAMS, merge, shipped_params, tokenized_dir

STEPS = 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    """The tiny model, prepared, tokenized and SFT-trained, with the shipped preference set."""
    import os

    raw = merge(shipped_params(), TINY_PARAMS)
    root = tokenized_dir(tmp_path_factory.mktemp("align"), tiny_model, raw)
    shutil.copy(REPO / "data/raw/preferences.jsonl", root / "data/raw/preferences.jsonl")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        train.run(parse_params(raw, "params.yaml"))
    finally:
        os.chdir(cwd)
    return root


def params_with(root: Path, **align_params):
    raw = merge(yaml.safe_load((root / "params.yaml").read_text()), {"align": align_params})
    return parse_params(raw, "params.yaml")


def test_off_by_default_records_only_that(trained, monkeypatch):
    monkeypatch.chdir(trained)
    assert align.run(params_with(trained)) == {"enabled": False}
    assert (trained / "artifacts/aligned/README.md").read_text() == align.DISABLED_NOTE


def test_dpo_trains_from_the_sft_adapter_and_reports_held_out_rewards(trained, monkeypatch):
    from peft import PeftModel

    from tasks.modeling import load_base

    monkeypatch.chdir(trained)
    params = params_with(trained, enabled=True, max_steps=STEPS, per_device_train_batch_size=2,
                         per_device_eval_batch_size=4)
    metrics = align.run(params)
    assert metrics["steps"] == STEPS
    assert metrics["pairs"]["train"] > 0 and metrics["pairs"]["held_out"] > 0
    held_out = json.loads(Path("metrics/align.json").read_text())["held_out"]
    assert {"rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"} <= set(held_out)
    assert 0 <= held_out["rewards/accuracies"] <= 1
    config = json.loads(Path("artifacts/aligned/adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    model = PeftModel.from_pretrained(load_base(params, quantized=True), "artifacts/aligned")
    assert list(model.peft_config) == ["default"]  # TRL's frozen "ref" copy is not saved


def test_evaluate_and_export_use_the_aligned_adapter_when_align_is_on(trained, monkeypatch):
    from tasks import evaluate, export
    from tasks.io import sha256_path

    monkeypatch.chdir(trained)
    params = params_with(trained, enabled=True, max_steps=STEPS)
    if not Path("artifacts/aligned/adapter_config.json").is_file():
        align.run(params)
    small = params.model_copy(update={"evaluate": params.evaluate.model_copy(
        update={"max_samples": 2, "max_new_tokens": 4})})
    assert set(evaluate.run(small)) == {"base", "tuned", "delta"}
    export.run(small)
    manifest = json.loads(Path("artifacts/merged/manifest.json").read_text())
    assert manifest["inputs"]["adapter"] == "artifacts/aligned"
    assert manifest["inputs"]["adapter_sha256"] == sha256_path(Path("artifacts/aligned"))
    assert "then DPO on" in Path("artifacts/merged/README.md").read_text()


def test_held_out_pairs_follow_the_data_split(trained, monkeypatch):
    from tasks.prepare import _split_of

    monkeypatch.chdir(trained)
    params = params_with(trained, enabled=True)
    data = align.pairs(params)
    assert all(_split_of(p["id"], params) != "train" for p in data["held_out"])
    assert all(_split_of(p["id"], params) == "train" for p in data["train"])
    first = data["train"][0]
    assert first["prompt"].startswith("Summarize the following conversation.")
    assert first["chosen"].startswith(" ") and first["chosen"] != first["rejected"]


def test_a_bad_preference_record_names_its_line(trained, monkeypatch, tmp_path):
    monkeypatch.chdir(trained)
    bad = Path("data/raw/bad-preferences.jsonl")
    bad.write_text(json.dumps({"id": "x1", "dialogue": "A: hi", "chosen": "A says hi."}) + "\n")
    with pytest.raises(DataError, match=r"bad-preferences.jsonl line 1: missing field 'rejected'"):
        align.pairs(params_with(trained, enabled=True, path=str(bad)))
