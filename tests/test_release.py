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

from .conftest import copy_workspace, finetune, merge, stage

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



@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend and local artifact store."""
    import os
    import subprocess
    import sys

    from tasks.serve import free_port

    from .conftest import wait_until_up

    root = tmp_path_factory.mktemp("mlflow")
    port = free_port("127.0.0.1")
    mlflow = Path(sys.executable).parent / "mlflow"
    with (root / "server.log").open("w") as log:
        proc = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", f"sqlite:///{root}/db.sqlite",
                                 "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
                                 "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(proc, url)
    yield url
    os.killpg(proc.pid, 15)
    proc.wait(30)


def aliases(url: str, name: str) -> dict[str, int]:
    from mlflow import MlflowClient

    model = MlflowClient(tracking_uri=url).get_registered_model(name)
    return {alias: int(version) for alias, version in model.aliases.items()}


@pytest.mark.slow
def test_mlflow_sees_two_nightlies_the_better_one_champion(ws, mlflow_server, monkeypatch):
    """Two nightlies against a real MLflow server: the first (promoted over the base) holds
    both aliases; the second, a retrained model short of min_gain, becomes a new version with
    only `challenger`. Each version carries the model, its lineage and its scores."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    first = stage("promote", promote_params(ws, registry="mlflow", mlflow_model="nightly"), ws)
    assert first["promoted"] is True and first["mlflow"]["version"] == 1
    assert aliases(mlflow_server, "nightly") == {"champion": 1, "challenger": 1}

    params = promote_params(ws, registry="mlflow", mlflow_model="nightly", min_gain=0.5)
    retrained = parse_params(merge(params.model_dump(mode="json"), {"train": {"max_steps": 3}}), "params.yaml")
    for name in ("train", "evaluate", "export"):
        stage(name, retrained, ws)
    second = stage("promote", retrained, ws)
    assert second["promoted"] is False and second["mlflow"]["version"] == 2
    assert second["challenger"]["sha256"] != first["challenger"]["sha256"]
    assert aliases(mlflow_server, "nightly") == {"champion": 1, "challenger": 2}
    assert json.loads((ws / "registry/latest.json").read_text())["sha256"] == first["challenger"]["sha256"]

    client = MlflowClient(tracking_uri=mlflow_server)
    version = client.get_model_version("nightly", "2")
    assert version.tags["sha256"] == second["challenger"]["sha256"]
    assert version.tags["test_sha256"] == second["test_sha256"] and "git_commit" in version.tags
    run = client.get_run(version.run_id)
    assert run.data.metrics["challenger_score"] == second["challenger"]["score"]
    assert run.data.params["train.max_steps"] == "3"
    stored = {f.path for f in client.list_artifacts(version.run_id, "model")}
    assert {"model/config.json", "model/model.safetensors"} <= stored
    # the same candidate again: no new upload, the alias stays
    assert stage("promote", retrained, ws)["mlflow"]["version"] == 2

    # approval: champion moves in MLflow only when a person approves
    (ws / "params.yaml").write_text(yaml.safe_dump(merge(retrained.model_dump(mode="json"), {
        "promote": {"min_gain": ALWAYS, "approval": "required"}})))
    pending = finetune(ws, "promote", extra_env={"MLFLOW_TRACKING_URI": mlflow_server})
    assert pending.returncode == 0, pending.stderr[-2000:]
    assert aliases(mlflow_server, "nightly") == {"champion": 1, "challenger": 2}
    approved = finetune(ws, "promote", "--approve", extra_env={"MLFLOW_TRACKING_URI": mlflow_server})
    assert approved.returncode == 0, approved.stderr[-2000:]
    assert aliases(mlflow_server, "nightly") == {"champion": 2, "challenger": 2}
    assert json.loads((ws / "registry/latest.json").read_text())["sha256"] == second["challenger"]["sha256"]


def test_mlflow_unreachable_fails_promote_and_changes_no_registry(ws):
    from tasks.serve import free_port

    promote_params(ws, registry="mlflow")
    closed = f"http://127.0.0.1:{free_port('127.0.0.1')}"
    out = finetune(ws, "promote", extra_env={"MLFLOW_TRACKING_URI": closed,
                                             "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                                             "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
    assert out.returncode == 2
    [line] = [x for x in out.stderr.splitlines() if x.startswith("finetune promote: error:")]
    assert f"MLflow at {closed} failed while registering the candidate" in line
    assert "neither registry was changed" in line
    assert not (ws / "registry/latest.json").exists() and entries(ws) == set()
    out = finetune(ws, "promote", extra_env={"MLFLOW_TRACKING_URI": None})
    assert out.returncode == 2 and "MLFLOW_TRACKING_URI is not set" in out.stderr
