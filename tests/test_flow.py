"""The Prefect flow `finetune` under prefect_test_harness (a real, temporary Prefect API):
the stages of dvc.yaml as tasks in DVC's order, skips on a second run, UI artifacts, the
promotion gate, typed overrides, and a failing stage failing the run."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from tasks.stages import STAGES as stage_table

from .conftest import TINY_PARAMS, env, make_workspace, merge

# A runner end to end: skipped by `make test-fast`.
pytestmark = pytest.mark.e2e

STEPS = TINY_PARAMS["train"]["max_steps"]
LM_EVAL_TASK = "data/lm_eval/smoke_mc.yaml"
STAGES = list(stage_table)  # dvc.yaml order; tests/test_structure.py keeps the two equal


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    # The harness isolates the database but not result storage.
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path_factory.mktemp("results")}):
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model, harness):
    # Always promote; the general-capability check on a few items of the repository's task,
    # with a max_regression no drop in accuracy can exceed.
    params = merge(TINY_PARAMS, {"promote": {"min_gain": -1.0, "max_regression": 1.0},
                                 "evaluate": {"lm_eval_tasks": [LM_EVAL_TASK], "lm_eval_limit": 4}})
    ws = make_workspace(tmp_path_factory.mktemp("flow"), tiny_model, params)
    saved_cwd, saved_env = os.getcwd(), dict(os.environ)
    os.chdir(ws)
    os.environ.update(env())
    yield ws
    os.chdir(saved_cwd)
    os.environ.clear()
    os.environ.update(saved_env)


def task_runs(state) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    return sorted(runs, key=lambda r: r.start_time)


def artifact(key: str):
    from prefect.artifacts import Artifact

    return Artifact.get(key)


@pytest.fixture(scope="module")
def first_run(ws):
    from flows.finetune import finetune

    return finetune(return_state=True)


def test_stages_run_as_tasks_in_dvc_order(first_run):
    assert first_run.is_completed()
    runs = task_runs(first_run)
    assert [r.name for r in runs] == STAGES
    assert all(r.state.name == "Completed" for r in runs)
    summary = first_run.result()
    assert {s: v["status"] for s, v in summary["stages"].items()} == dict.fromkeys(STAGES, "ran")
    assert all(v["version"] for v in summary["stages"].values())
    assert summary["promoted"] is True and Path(summary["latest"]).is_dir()
    assert set(summary["scores"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert set(summary["lm_eval"]) == {"finetune_smoke_mc"}


def test_artifacts_for_the_ui(first_run):
    table = artifact("scores-base-vs-tuned")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["metric"] for r in rows] == ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    assert set(rows[0]) == {"metric", "base", "tuned", "delta", "tuned_ci95"}
    assert "| reference | base | tuned |" in artifact("sample-predictions").data
    assert "artifacts/merged" in artifact("exported-model").data
    assert "PROMOTED" in artifact("promotion").data and "| champion | `base`" in artifact("promotion").data
    capability = artifact("general-capability")
    (task,) = json.loads(capability.data) if isinstance(capability.data, str) else capability.data
    assert task["task"] == "finetune_smoke_mc" and task["num_examples"] == 4
    assert task["drop"] == pytest.approx(task["base"] - task["tuned"], abs=1e-6)
    assert "| finetune_smoke_mc (acc,none) | drop from the base <= max_regression 1.0 |" in artifact("promotion").data
    leakage = artifact("data-leakage")
    leakage_rows = json.loads(leakage.data) if isinstance(leakage.data, str) else leakage.data
    assert [r["kind"] for r in leakage_rows] == ["exact", "normalized", "near"]


def test_train_progress_is_relayed_to_the_ui(first_run):
    progress = artifact("train-progress")
    assert progress.type == "progress" and float(progress.data) == 100.0
    assert progress.description == f"train: step {STEPS} of {STEPS}"
    status = artifact("train-status")
    (row,) = json.loads(status.data) if isinstance(status.data, str) else status.data
    assert row["step"] == row["max_steps"] == STEPS
    assert row["loss"] > 0 and row["learning_rate"] is not None and row["tokens_per_second"] > 0
    assert row["eta"] == "0:00:00"
    assert row["eval_loss"] is None  # the latest validation loss, with train.eval_steps only


def test_second_run_skips_every_stage(first_run):
    from flows.finetune import finetune

    state = finetune(return_state=True)
    assert state.is_completed()
    assert [r.state.name for r in task_runs(state)] == ["Skipped"] * len(STAGES)
    assert {v["status"] for v in state.result()["stages"].values()} == {"skipped"}


def test_gate_miss_keeps_previous_model(first_run, ws):
    from flows.finetune import finetune

    before = json.loads((ws / "registry/latest.json").read_text())
    state = finetune(overrides={"promote": {"min_gain": 5.0}}, return_state=True)
    summary = state.result()
    assert summary["promoted"] is False and "not promoted" in summary["promotion"]
    assert summary["stages"]["promote"]["status"] == "ran"
    assert summary["stages"]["train"]["status"] == "skipped"
    assert json.loads((ws / "registry/latest.json").read_text()) == before
    assert "NOT PROMOTED" in artifact("promotion").data
    # the override is written into params.yaml, as `dvc exp run -S` does
    assert yaml.safe_load((ws / "params.yaml").read_text())["promote"]["min_gain"] == 5.0


def test_invalid_override_fails_before_any_stage(first_run, ws):
    from flows.finetune import finetune

    before = (ws / "params.yaml").read_text()
    state = finetune(overrides={"train": {"learning_rate": -1}}, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="train.learning_rate"):
        state.result()
    assert task_runs(state) == []
    assert (ws / "params.yaml").read_text() == before


def test_failed_stage_fails_the_run_then_resumes(first_run, ws):
    from flows.finetune import finetune, main

    data = ws / "data/raw/dialogues.jsonl"
    original = data.read_text()
    data.write_text("{broken\n" + original.split("\n", 1)[1])
    try:
        state = finetune(return_state=True)
        assert state.is_failed()
        with pytest.raises(Exception, match=r"stage 'prepare' failed:(.|\n)*dialogues.jsonl line 1"):
            state.result()
        # `python -m flows.finetune` ends in one line naming the stage and its error, exit 2
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert main() == 2
        # the last line: Prefect's own log lines may reach the same stream before it
        last = err.getvalue().splitlines()[-1]
        assert re.fullmatch(r"python -m flows\.finetune: error: stage 'prepare' failed \(finetune "
                            r"prepare: error: .*dialogues\.jsonl line 1.*\); its output is in the log "
                            r"above", last), err.getvalue()
    finally:
        data.write_text(original)
    state = finetune(return_state=True)
    assert state.is_completed()
    assert {v["status"] for v in state.result()["stages"].values()} == {"skipped"}


def test_lock_caught_mid_write_is_read_again(tmp_path):
    """A local run's tasks read dvc.lock while the run's DVC process may be rewriting it for
    the next stage (it truncates, then writes): read_lock waits for a complete, settled copy."""
    import threading
    import time

    from flows.finetune import read_lock

    lock = tmp_path / "dvc.lock"
    whole = "schema: '2.0'\nstages:\n  train:\n    cmd: finetune train\n  export:\n    cmd: finetune export\n"
    lock.write_text("")  # truncated: an empty file

    def finish() -> None:
        time.sleep(0.2)
        lock.write_text(whole[:40])  # half written
        time.sleep(0.2)
        lock.write_text(whole)

    writer = threading.Thread(target=finish)
    writer.start()
    assert set(read_lock(tmp_path, need=("train", "export"))) == {"train", "export"}
    writer.join()


@pytest.fixture
def receiver():
    """A local HTTP endpoint standing in for Slack: the JSON bodies POSTed to it, in order."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()


def answer_when_paused(approve: bool, note: str, timeout_s: float = 120):
    """Waits for the flow run paused on its approval form, then answers it through the API
    (what the UI's Resume button sends)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.flow_runs import resume_flow_run

    paused = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
    deadline = time.monotonic() + timeout_s
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=paused)
        if runs:
            break
        assert time.monotonic() < deadline, "no flow run paused for approval"
        time.sleep(0.5)
    [run] = runs
    assert "AWAITING APPROVAL" in artifact("promotion").data
    resume_flow_run(run.id, run_input={"approve": approve, "note": note})


def run_in_thread(**kwargs):
    """The flow in a thread (it blocks while paused); returns a function giving its state."""
    import threading

    from flows.finetune import finetune

    out: dict = {}
    # Daemon, and a bounded wait: a test that fails before answering leaves no run holding pytest.
    thread = threading.Thread(target=lambda: out.update(state=finetune(return_state=True, approval_timeout_s=300,
                                                                       **kwargs)), daemon=True)
    thread.start()

    def finished():
        thread.join(timeout=600)
        return out["state"]
    return finished


def test_approval_pauses_the_run_and_notifications_say_what_happened(first_run, ws, receiver):
    """promote.approval: required pauses the run after promote's decision; a rejection
    through the API leaves the registry as it was, an approval applies the promotion (and
    dvc.lock records it: the next run skips promote); each outcome, and a failure, is posted
    through a notification block."""
    import shutil

    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    from flows.finetune import finetune

    url, received = receiver
    CustomWebhookNotificationBlock(name="nightly", url=url, json_data={"text": "{{subject}} | {{body}}"},
                                   allow_private_urls=True).save("nightly-test", overwrite=True)
    block = "custom-webhook/nightly-test"
    for entry in (ws / "registry").iterdir():  # nothing promoted: the base is the champion
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    finished = run_in_thread(overrides={"promote": {"approval": "required", "min_gain": -1.0}},
                             notify_block=block)
    answer_when_paused(approve=False, note="bob: wait for the new data")
    summary = finished().result()
    assert summary["promoted"] is False and summary["approval"] == "rejected"
    assert "rejected (bob: wait for the new data); nothing was promoted yet" in summary["promotion"]
    assert not (ws / "registry/latest.json").exists() and not any((ws / "registry").iterdir())

    finished = run_in_thread(overrides={"promote": {"min_gain": -0.9}}, notify_block=block)
    answer_when_paused(approve=True, note="ana")
    summary = finished().result()
    assert summary["promoted"] is True and summary["approval"] == "approved"
    latest = json.loads((ws / "registry/latest.json").read_text())
    assert summary["latest"] == latest["path"] and "approved (ana); promoted to" in summary["promotion"]
    assert "PROMOTED" in artifact("promotion").data
    # the approval is promote's recorded result: nothing left to run
    state = finetune(notify_block=block, return_state=True)
    assert {v["status"] for v in state.result()["stages"].values()} == {"skipped"}

    failed = finetune(overrides={"train": {"learning_rate": -1}}, notify_block=block, return_state=True)
    assert failed.is_failed()
    texts = [body["text"] for body in received]
    assert [t.split(" | ")[0].rsplit(": ", 1)[1] for t in texts] == \
        ["NOT PROMOTED", "PROMOTED", "FAILED"], texts  # the run that did nothing says nothing
    assert "rejected (bob: wait for the new data)" in texts[0] and "approved (ana)" in texts[1]
    assert "train.learning_rate" in texts[2]
    assert all("/flow-run/" in t for t in texts), texts  # a link to the run


def test_a_notification_block_that_does_not_exist_fails_the_run_first(first_run, ws):
    from flows.finetune import finetune

    state = finetune(notify_block="custom-webhook/no-such-block", return_state=True)
    assert state.is_failed() and task_runs(state) == []
    with pytest.raises(ValueError, match="notify_block 'custom-webhook/no-such-block': no such Prefect block"):
        state.result()
    # The Prefect variable names it for `python -m flows.finetune`: one line, exit 2.
    from prefect.variables import Variable

    from flows.finetune import NOTIFY_VARIABLE, main

    Variable.set(NOTIFY_VARIABLE, "custom-webhook/no-such-block", overwrite=True)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            assert main() == 2
    finally:
        Variable.unset(NOTIFY_VARIABLE)
    assert err.getvalue().splitlines()[-1].startswith(
        "python -m flows.finetune: error: notify_block 'custom-webhook/no-such-block': no such Prefect block"), \
        err.getvalue()
