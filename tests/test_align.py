"""align: off by default, where it only records that; on, it runs TRL's DPO (or KTO, ORPO:
align.method) from the SFT adapter for a few steps, writes held-out reward metrics and an
adapter that loads back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tasks import align
from tasks.config import parse_params
from tasks.errors import DataError
from tasks.workspace import Workspace

from .conftest import copy_workspace, merge, stage

STEPS = 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory, trained_workspace):
    """The tiny model, prepared, tokenized and SFT-trained (TINY_PARAMS), with the shipped
    preference set: the session's workspace, copied."""
    return copy_workspace(trained_workspace, tmp_path_factory.mktemp("align") / "ws")


def params_with(root: Path, **align_params):
    raw = merge(yaml.safe_load((root / "params.yaml").read_text()), {"align": align_params})
    return parse_params(raw, "params.yaml")


@pytest.fixture(scope="module")
def aligned(trained) -> dict:
    """align's metrics after one DPO run from the SFT adapter (artifacts/aligned/), logged to
    TensorBoard as train.report_to asks."""
    raw = merge(yaml.safe_load((trained / "params.yaml").read_text()), {
        "train": {"report_to": ["tensorboard"]},
        "align": {"enabled": True, "max_steps": STEPS, "per_device_train_batch_size": 2,
                  "per_device_eval_batch_size": 4}})
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(trained)
        return stage("align", parse_params(raw, "params.yaml"))


# Steps and learning rate at which KTO's and ORPO's loss falls on the tiny model from its first
# logged step to its last (training is deterministic on the CPU: full_determinism).
METHOD_RUN = {"max_steps": 6, "learning_rate": 5e-3, "per_device_train_batch_size": 4,
              "per_device_eval_batch_size": 8}


@pytest.fixture(scope="module", params=["kto", "orpo"])
def by_method(request, trained, tmp_path_factory) -> tuple[str, Path, dict]:
    """(method, its workspace, align's metrics) after a short KTO or ORPO run on a copy of the
    SFT workspace, from the shipped preference pairs."""
    method = request.param
    ws = copy_workspace(trained, tmp_path_factory.mktemp(method) / "ws")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ws)
        return method, ws, stage("align", params_with(ws, enabled=True, method=method, **METHOD_RUN))


def test_kto_and_orpo_train_and_lower_their_loss(by_method, monkeypatch):
    from peft import PeftModel

    from tasks.modeling import load_base

    method, ws, metrics = by_method
    assert metrics["method"] == method and metrics["steps"] == METHOD_RUN["max_steps"]
    assert metrics["loss"]["last"] < metrics["loss"]["first"], metrics["loss"]
    assert json.loads((ws / "metrics/align.json").read_text()) == json.loads(json.dumps(metrics))
    own = {"kto": {"kl", "rewards/chosen", "rewards/rejected"},
           "orpo": {"nll_loss", "log_odds_ratio", "rewards/accuracies", "rewards/margins"}}[method]
    assert own <= set(metrics["held_out"]), metrics["held_out"]
    monkeypatch.chdir(ws)
    model = PeftModel.from_pretrained(load_base(params_with(ws), quantized=True), "artifacts/aligned")
    assert list(model.peft_config) == ["default"]  # no reference copy saved (KTO's "ref")


def test_kto_reads_unpaired_rows_and_splits_pairs(trained, monkeypatch):
    monkeypatch.chdir(trained)
    rows = Path("data/raw/kto.jsonl")
    rows.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "u1", "dialogue": "A: hi", "completion": "A greets.", "label": True},
        {"id": "u2", "dialogue": "B: bye", "completion": "A greets.", "label": False},
        {"id": "u3", "dialogue": "C: yes", "chosen": "C agrees.", "rejected": "C leaves."}]))
    params = params_with(trained, enabled=True, method="kto", path=str(rows))
    data = {}
    for split, found in align._records(params, align._unpaired).items():
        data |= {(r["id"], r["completion"].strip()): r["label"] for r in found}
    assert data == {("u1", "A greets."): True, ("u2", "A greets."): False,
                    ("u3", "C agrees."): True, ("u3", "C leaves."): False}


@pytest.mark.parametrize(("record", "message"), [
    ({"id": "x1", "dialogue": "A: hi", "label": True},
     r"kto\.jsonl line 1: missing field 'completion' \(kto records need"),
    ({"id": "x1", "dialogue": "A: hi", "completion": "A says hi.", "label": "yes"},
     r"kto\.jsonl line 1: field 'label' must be true \(desirable\) or false \(undesirable\), not 'yes'"),
    ({"id": "x1", "dialogue": "A: hi", "chosen": "A says hi."},
     r"kto\.jsonl line 1: missing field 'rejected' \(preference records need"),
])
def test_a_bad_kto_record_names_its_line_and_field(trained, monkeypatch, record, message):
    monkeypatch.chdir(trained)
    bad = Path("data/raw/bad-kto.jsonl")
    bad.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match=message):
        align.unpaired(params_with(trained, enabled=True, method="kto", path=str(bad)))


# GRPO on a tiny verifiable task: every prompt's reference is the one-token answer ":", scored
# by exact match. The SFT smoke model samples it about once in 100 answers, so some groups of
# GRPO_RUN's 16 hold a hit to learn from. Measured here: the mean reward of the second half of
# the steps 0.064 against 0.019 for the first half, held-out exact match 0.0 -> 1.0; the same
# run with lr 1e-7 (no learning): 0.016 against 0.009, held-out 0.0 -> 0.0. Prompts are cut
# to their last PROMPT_CHARS characters: short sequences keep a step under half a second on
# 2 CPU cores.
GRPO_TARGET = ":"
PROMPT_CHARS = 30
GRPO_RUN = {"enabled": True, "method": "grpo", "max_steps": 40, "learning_rate": 0.05,
            "num_generations": 16, "per_device_train_batch_size": 32, "max_completion_length": 1,
            "rewards": [{"name": "exact_match"}]}
GAIN = 0.02  # the least rise of the mean sampled reward, second half of the steps over first


@pytest.fixture(scope="module")
def grpo(trained, tmp_path_factory) -> tuple[Path, dict]:
    """(workspace, align's metrics) after GRPO_RUN on the GRPO_TARGET task."""
    ws = copy_workspace(trained, tmp_path_factory.mktemp("grpo") / "ws")
    for split in ("train", "validation"):
        path = ws / f"data/prepared/{split}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({**r, "prompt": r["prompt"][-PROMPT_CHARS:],
                                            "completion": f" {GRPO_TARGET}"}) + "\n" for r in rows))
    raw = merge(yaml.safe_load((ws / "params.yaml").read_text()),
                {"train": {"gradient_checkpointing": False}, "align": GRPO_RUN})
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ws)
        return ws, stage("align", parse_params(raw, "params.yaml"))


def test_grpo_exact_match_raises_the_reward_over_steps_and_held_out(grpo, monkeypatch):
    from peft import PeftModel

    from tasks.modeling import load_base

    ws, metrics = grpo
    steps = GRPO_RUN["max_steps"]
    assert metrics["method"] == "grpo" and metrics["steps"] == steps
    assert len(metrics["reward"]) == len(metrics["kl"]) == steps
    half = steps // 2
    first, second = metrics["reward"][:half], metrics["reward"][half:]
    assert sum(second) / half > sum(first) / half + GAIN, metrics["reward"]
    sft, aligned = metrics["held_out"]["sft"], metrics["held_out"]["aligned"]
    assert set(sft) == {"reward", "exact_match"}
    assert aligned["reward"] > sft["reward"], metrics["held_out"]
    assert metrics["prompts"]["held_out"] > 0
    monkeypatch.chdir(ws)
    model = PeftModel.from_pretrained(load_base(params_with(ws), quantized=True), "artifacts/aligned")
    assert list(model.peft_config) == ["default"]  # GRPO's "ref" copy is not saved


def test_off_by_default_records_only_that(trained, tmp_path, monkeypatch):
    ws = copy_workspace(trained, tmp_path / "ws")  # leaves the module's aligned adapter alone
    monkeypatch.chdir(ws)
    assert stage("align", params_with(ws)) == {"enabled": False}
    assert (ws / "artifacts/aligned/README.md").read_text() == align.DISABLED_NOTE


def test_dpo_trains_from_the_sft_adapter_and_reports_held_out_rewards(trained, aligned, monkeypatch):
    from peft import PeftModel

    from tasks.modeling import load_base

    monkeypatch.chdir(trained)
    assert aligned["steps"] == STEPS
    assert aligned["pairs"]["train"] > 0 and aligned["pairs"]["held_out"] > 0
    held_out = json.loads(Path("metrics/align.json").read_text())["held_out"]
    assert {"rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"} <= set(held_out)
    assert 0 <= held_out["rewards/accuracies"] <= 1
    config = json.loads(Path("artifacts/aligned/adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    model = PeftModel.from_pretrained(load_base(params_with(trained), quantized=True), "artifacts/aligned")
    assert list(model.peft_config) == ["default"]  # TRL's frozen "ref" copy is not saved


def test_align_logs_dpo_to_the_same_trackers(trained, aligned):
    """train.report_to covers align's DPO run too (test_trackers.py reads the SFT run's)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = (Workspace(trained).trackers / "tensorboard").glob("align-*")
    events = EventAccumulator(str(run))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, STEPS + 1))


def test_evaluate_and_export_use_the_aligned_adapter_when_align_is_on(trained, aligned, monkeypatch):
    from tasks.io import sha256_path

    monkeypatch.chdir(trained)
    params = params_with(trained, enabled=True, max_steps=STEPS)
    small = params.model_copy(update={"evaluate": params.evaluate.model_copy(
        update={"max_samples": 2, "max_new_tokens": 4})})
    assert set(stage("evaluate", small)) == {"base", "tuned", "delta"}
    stage("export", small)
    manifest = json.loads(Path("artifacts/merged/manifest.json").read_text())
    assert manifest["inputs"]["adapter"] == "artifacts/aligned"
    assert manifest["inputs"]["adapter_sha256"] == sha256_path(Path("artifacts/aligned"))
    assert "then DPO on" in Path("artifacts/merged/README.md").read_text()


def test_held_out_pairs_follow_the_data_split(trained, monkeypatch):
    from tasks.records import split_of as _split_of

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
