"""promote, champion against challenger, over several nightly runs of the real stages (train,
evaluate, export, promote) on the tiny model: the first run compares with the base, later runs
with the promoted champion; a challenger that does not beat it by promote.min_gain leaves the
champion current, one that does replaces it; a changed test set re-scores the champion by
generating with it.

The tiny random models do not learn enough in a test's few steps to order two of them by
quality (both score about 0 ROUGE-L), so the challenger's margin is set through min_gain: a
positive one it cannot reach, a negative one it always clears.

The tests in this module run in order on one workspace."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tasks.config import parse_params

from .conftest import TINY_PARAMS, copy_workspace, finetune, merge, shipped_params, stage

FIRST = {"max_steps": 1}
SECOND = {"max_steps": 2}  # another adapter, so another registry entry
UNREACHABLE = 0.5  # ROUGE-L points no tiny challenger gains over another
ALWAYS = -1.0
SAMPLES = 12


def raw(train: dict, min_gain: float, max_samples: int = SAMPLES) -> dict:
    return merge(shipped_params(), merge(TINY_PARAMS, {
        "train": train, "promote": {"min_gain": min_gain},
        "evaluate": {"max_samples": max_samples, "bootstrap_samples": 200}}))


@pytest.fixture(scope="module")
def ws(tmp_path_factory, trained_workspace):
    """The session's workspace (prepared and tokenized with TINY_PARAMS, as here), with no
    registry yet: the nights below train, evaluate and export again with their own settings."""
    root = copy_workspace(trained_workspace, tmp_path_factory.mktemp("promote") / "ws")
    shutil.rmtree(root / "registry", ignore_errors=True)
    (root / "metrics/promote.json").unlink(missing_ok=True)
    cwd = os.getcwd()
    os.chdir(root)
    yield root
    os.chdir(cwd)


def night(train: dict, min_gain: float, max_samples: int = SAMPLES) -> dict:
    """One nightly run from train to promote, in this process."""
    params = parse_params(raw(train, min_gain, max_samples), "params.yaml")
    stage("train", params)
    stage("evaluate", params)
    stage("export", params)
    return stage("promote", params)


def latest() -> dict:
    return json.loads(Path("registry/latest.json").read_text())


@pytest.fixture(scope="module")
def first(ws):
    return night(FIRST, ALWAYS)


def test_first_run_compares_with_the_base(first):
    assert first["champion"]["model"] == "base" and first["promoted"] is True
    evaluation = json.loads(Path("metrics/eval.json").read_text())
    assert first["champion"]["score"] == evaluation["base"]["rougeL"]["mean"]
    assert first["challenger"]["score"] == evaluation["tuned"]["rougeL"]["mean"]
    d = first["difference"]
    assert d["ci_low"] <= d["mean"] <= d["ci_high"]
    assert d["mean"] == pytest.approx(first["challenger"]["score"] - first["champion"]["score"], abs=1e-5)
    entry = Path(latest()["path"])
    assert {"model.safetensors", "predictions.jsonl", "scored.json", "promotion.json"} <= \
        {p.name for p in entry.iterdir()}
    promotion = json.loads((entry / "promotion.json").read_text())
    assert promotion["champion"]["model"] == "base"
    assert latest()["test_sha256"] == first["test_sha256"]


@pytest.fixture(scope="module")
def worse(first):
    champion = latest()
    return first, champion, night(SECOND, UNREACHABLE)


def test_a_challenger_short_of_min_gain_is_not_promoted_and_the_champion_stays(worse):
    first, champion, second = worse
    assert second["champion"] == {"model": first["latest"], "score": first["challenger"]["score"],
                                  "predictions": "reused"}
    assert second["difference"]["mean"] < UNREACHABLE and second["promoted"] is False
    assert "not promoted; the champion stays current" in second["reason"]
    assert latest() == champion and second["latest"] == champion["path"]
    assert json.loads(Path("metrics/promote.json").read_text()) == second


@pytest.fixture(scope="module")
def better(worse):
    _, champion, _ = worse
    return champion, stage("promote", parse_params(raw(SECOND, ALWAYS), "params.yaml"))


def test_a_challenger_beating_the_champion_replaces_it(better):
    champion, third = better
    assert third["champion"]["model"] == champion["path"] and third["promoted"] is True
    assert third["latest"] != champion["path"] and latest()["path"] == third["latest"]
    assert latest()["difference"] == third["difference"]
    d = third["difference"]
    assert d["ci_low"] <= d["mean"] <= d["ci_high"]


def test_bootstrap_is_deterministic(better):
    params = parse_params(raw(SECOND, UNREACHABLE), "params.yaml")
    assert stage("promote", params) == stage("promote", params)


def test_a_changed_test_set_re_scores_the_champion(better):
    champion = latest()
    params = parse_params(raw(SECOND, UNREACHABLE, max_samples=SAMPLES - 4), "params.yaml")
    stage("evaluate", params)
    decision = stage("promote", params)
    assert decision["champion"]["predictions"].startswith("generated: the test set changed")
    assert "champion re-scored (the test set changed" in decision["reason"]
    assert decision["num_examples"] == SAMPLES - 4 and decision["test_sha256"] != champion["test_sha256"]
    assert decision["promoted"] is False and latest() == champion
    # The re-scored predictions are stored: the next run reuses them.
    entry = Path(champion["path"])
    assert json.loads((entry / "scored.json").read_text())["test_sha256"] == decision["test_sha256"]
    again = stage("promote", params)
    assert again["champion"]["predictions"] == "reused"
    assert again["champion"]["score"] == decision["champion"]["score"]


def test_finetune_registry_keeps_the_registry_outside_the_workspace(better, tmp_path):
    """FINETUNE_REGISTRY (what nightly-remote sets) moves the registry: the first run there
    meets the base, the next one the champion it promoted; the workspace's is untouched."""
    import yaml

    from tasks.workspace import REGISTRY_ENV

    Path("params.yaml").write_text(yaml.safe_dump(raw(SECOND, ALWAYS, max_samples=SAMPLES - 4)))
    before = latest()
    kept = tmp_path / "kept/registry"

    def promote() -> dict:
        # The CLI in this process: the variable is read where `finetune promote` reads it.
        done = finetune(Path.cwd(), "promote", extra_env={REGISTRY_ENV: str(kept)})
        assert done.returncode == 0, done.stderr
        return json.loads(Path("metrics/promote.json").read_text())

    first_there = promote()
    assert first_there["champion"]["model"] == "base" and first_there["promoted"] is True
    pointer = json.loads((kept / "latest.json").read_text())
    assert Path(pointer["path"]).parent == kept and first_there["latest"] == pointer["path"]
    second_there = promote()
    assert second_there["champion"] == {"model": pointer["path"], "score": first_there["challenger"]["score"],
                                        "predictions": "reused"}
    assert latest() == before
