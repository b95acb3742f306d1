"""The release path after promote's gate, on a copy of the session's trained workspace:
- the serve check (promote.serve_check_rows): the candidate, served by transformers serve, must
  answer the test prompts as evaluate's tuned predictions did; a candidate whose weights are
  the base's (a server that dropped the adapter) is refused, and the promotion undone;
- approval (promote.approval: required): the promotion waits in registry/pending.json until
  `finetune promote --approve` or `--reject`, and a newer decision supersedes it.
The Prefect side (the paused run, its form, notifications) is in tests/test_flow.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tasks.config import parse_params

from .conftest import copy_workspace, finetune, stage

ALWAYS = -1.0  # a min_gain every tiny challenger clears (tests/test_promote.py says why)
SERVED_ROWS = 4


@pytest.fixture
def ws(tmp_path, trained_workspace) -> Path:
    """The trained workspace with nothing promoted yet."""
    root = copy_workspace(trained_workspace, tmp_path / "ws")
    shutil.rmtree(root / "registry", ignore_errors=True)
    (root / "metrics/promote.json").unlink(missing_ok=True)
    return root


def promote_params(root: Path, **promote):
    """params.yaml with these promote.* keys (min_gain: ALWAYS unless given), written and parsed."""
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["promote"] = {**raw.get("promote", {}), "min_gain": ALWAYS, **promote}
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return parse_params(raw, "params.yaml")


def entries(root: Path) -> set[str]:
    return {p.name for p in (root / "registry").iterdir() if p.is_dir()}


def decision(root: Path) -> dict:
    return json.loads((root / "metrics/promote.json").read_text())


@pytest.mark.slow
def test_a_served_candidate_answering_as_evaluate_did_is_promoted(ws):
    result = stage("promote", promote_params(ws, serve_check_rows=SERVED_ROWS), ws)
    assert result["promoted"] is True
    assert result["serve_check"] == {"rows": SERVED_ROWS, "differing": []}
    latest = json.loads((ws / "registry/latest.json").read_text())
    assert latest["path"] == result["latest"] and Path(latest["path"]).name in entries(ws)
    assert latest["sha256"] == result["challenger"]["sha256"]


@pytest.mark.slow
def test_a_served_candidate_with_the_base_weights_is_refused_and_undone(ws, tiny_model):
    """The planted mismatch: the export's weights replaced by the base model's, as a server
    that silently drops the adapter would serve."""
    shutil.copy(tiny_model / "model.safetensors", ws / "artifacts/merged/model.safetensors")
    promote_params(ws, serve_check_rows=SERVED_ROWS)
    out = finetune(ws, "promote")
    assert out.returncode == 2, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("finetune promote: error: ") and "test prompts differently from evaluate's " \
        "tuned predictions" in line and "promotion undone; nothing was promoted yet" in line, out.stderr
    assert "metrics/promote.json (serve_check.differing)" in line
    found = decision(ws)
    assert found["promoted"] is False and found["latest"] is None
    differing = found["serve_check"]["differing"]
    assert 0 < len(differing) <= SERVED_ROWS
    assert all(row["served"] != row["expected"] for row in differing)
    # undone: no entry staged, nothing current
    assert entries(ws) == set() and not (ws / "registry/latest.json").exists()
    # what the flow's promotion artifact shows
    from flows.finetune import promotion_markdown

    shown = promotion_markdown(found)
    assert shown.startswith("**NOT PROMOTED**") and f"{SERVED_ROWS - len(differing)} of {SERVED_ROWS} served" in shown
    assert all(f"| {row['id']} |" in shown for row in differing)


def test_approval_required_waits_then_approve_applies_it(ws):
    pending = stage("promote", promote_params(ws, approval="required"), ws)
    assert pending["promoted"] is False and pending["approval"] == {"status": "pending"}
    assert "awaiting approval" in pending["reason"] and pending["latest"] is None
    assert not (ws / "registry/latest.json").exists() and (ws / "registry/pending.json").is_file()
    [staged] = entries(ws)

    out = finetune(ws, "promote", "--approve", "--note", "ana: scores read")
    assert out.returncode == 0, out.stderr[-2000:]
    approved = decision(ws)
    assert approved == json.loads(out.stdout)
    assert approved["promoted"] is True
    assert approved["approval"] == {"status": "approved", "note": "ana: scores read"}
    assert "approved (ana: scores read); promoted to" in approved["reason"]
    latest = json.loads((ws / "registry/latest.json").read_text())
    assert Path(latest["path"]).name == staged and approved["latest"] == latest["path"]
    assert json.loads((Path(latest["path"]) / "promotion.json").read_text())["approval"]["status"] == "approved"
    assert not (ws / "registry/pending.json").exists()
    # nothing left to answer
    again = finetune(ws, "promote", "--reject")
    assert again.returncode == 2 and "no promotion awaits approval" in again.stderr


def test_a_rejected_promotion_leaves_the_registry_as_it_was(ws):
    stage("promote", promote_params(ws, approval="required"), ws)
    out = finetune(ws, "promote", "--reject", "--note", "not this week")
    assert out.returncode == 0, out.stderr[-2000:]
    rejected = decision(ws)
    assert rejected["promoted"] is False
    assert rejected["approval"] == {"status": "rejected", "note": "not this week"}
    assert rejected["reason"].endswith("rejected (not this week); nothing was promoted yet")
    assert entries(ws) == set() and not (ws / "registry/latest.json").exists()


def test_a_newer_decision_supersedes_the_pending_one_and_params_must_match(ws):
    params = promote_params(ws, approval="required")
    stage("promote", params, ws)
    first = json.loads((ws / "registry/pending.json").read_text())
    stage("promote", params, ws)  # the same candidate decided again: one pending, one entry
    assert json.loads((ws / "registry/pending.json").read_text())["path"] == first["path"]
    assert len(entries(ws)) == 1
    promote_params(ws, approval="required", min_gain=-0.5)  # params changed since the decision
    out = finetune(ws, "promote", "--approve")
    assert out.returncode == 2 and "params.yaml changed since promote decided" in out.stderr
    assert not (ws / "registry/latest.json").exists()

