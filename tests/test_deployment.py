"""The nightly deployment for real: a `prefect server` on 127.0.0.1, the `gpu` process pool,
`prefect deploy --all` from prefect.yaml, `prefect deployment run finetune/nightly`, and a
worker that runs it to Completed; headless Chromium then loads the UI's pages (the run, train's
progress while it runs and when done, train's status table, a sweep's table) and screenshots
them into test-artifacts/. Every process started here is stopped at the end."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tasks.config import deep_merge

from tasks.stages import STAGES

from .conftest import CHROMIUM, CHROMIUM_MISSING, REPO, TINY_PARAMS, chromium, env, make_workspace, run

# A runner end to end: skipped by `make test-fast`.
pytestmark = pytest.mark.e2e

SERVER_START_TIMEOUT = 120
SCREENSHOTS = REPO / "test-artifacts"
COMPLETED: dict[str, str] = {}  # flow run id of the nightly run, for the UI check
# What the browser saw of train's progress artifact while the nightly run's train was running.
RUNNING: dict[str, str] = {}
# Enough steps (and no checkpoint before the last) that train runs for several of the flow's
# relay intervals (flows.finetune.PROGRESS_POLL_S): time to load a below-100% progress page.
# (About 10 steps/s on 2 shared CPU cores since gradient checkpointing is off where memory is
# plentiful; 150 steps ended before the browser had the page; it takes some seconds per page.)
MAX_STEPS = 300
NIGHTLY_PARAMS = deep_merge(TINY_PARAMS, {"train": {"max_steps": MAX_STEPS, "save_steps": MAX_STEPS}})
STEP = re.compile(r"step (\d+) of (\d+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(url: str, path: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{url}{path}", data=data, method="POST" if data else "GET",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


@contextlib.contextmanager
def prefect_server(home: Path, **settings: str):
    """`prefect server start` on 127.0.0.1 and a free port, with PREFECT_HOME at `home` and
    any other Prefect settings; yields the env that points clients at it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    e = {**env(), "PREFECT_HOME": str(home), "PREFECT_API_URL": url, **settings}
    log = (home / "server.log").open("w")
    proc = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=e, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            try:
                api(url, "/health")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("prefect server did not start:\n"
                                         + (home / "server.log").read_text()) from None
                time.sleep(1)
        yield {"url": url, "env": e, "home": home, "ui": f"http://127.0.0.1:{port}"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with prefect_server(tmp_path_factory.mktemp("prefect-home")) as s:
        yield s


def prefect(args: list[str], cwd: Path, e: dict, timeout: int = 600) -> str:
    proc = subprocess.run(["prefect", *args], cwd=cwd, env=e, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def make_pools(ws: Path, e: dict) -> str:
    """`python -m flows.pools` (what `make pools` runs), the README's step before
    `prefect deploy --all`."""
    proc = subprocess.run(["python", "-m", "flows.pools"], cwd=ws, env=e, capture_output=True, text=True)
    assert proc.returncode == 0, f"python -m flows.pools:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def progress_artifact(server: dict, flow_run_id: str) -> dict | None:
    """The flow run's `train-progress` artifact (one, updated in place as train goes)."""
    found = api(server["url"], "/artifacts/filter",
                {"artifacts": {"key": {"any_": ["train-progress"]}, "flow_run_id": {"any_": [flow_run_id]}}})
    return found[0] if found else None


def capture_running_progress(server: dict, flow_run_id: str) -> bool:
    """If train's progress artifact is below 100%, loads its page in headless Chromium (DOM
    and screenshot) into RUNNING; returns whether it did."""
    artifact = progress_artifact(server, flow_run_id)
    if artifact is None or artifact["data"] >= 100:
        return False
    page = f"{server['ui']}/artifacts/artifact/{artifact['id']}"
    RUNNING.update(api_percent=str(artifact["data"]), api_description=artifact["description"],
                   dom=chromium(["--dump-dom", page], server["home"]))
    SCREENSHOTS.mkdir(exist_ok=True)
    shot = SCREENSHOTS / "prefect-ui-train-progress-running.png"
    chromium([f"--screenshot={shot}", page], server["home"])
    RUNNING["screenshot"] = str(shot)
    # Whether train was still below 100% once the browser was done (else the race was lost).
    RUNNING["after"] = str(progress_artifact(server, flow_run_id)["data"])
    return True


def test_nightly_deployment_runs_on_a_gpu_pool_worker(server, tmp_path_factory, tiny_model):
    ws = make_workspace(tmp_path_factory.mktemp("deploy"), tiny_model, NIGHTLY_PARAMS)
    e = {**server["env"], "PWD": str(ws)}  # prefect.yaml's pull step reads $PWD at deploy time
    # The README's steps: create every pool prefect.yaml names, then deploy them all.
    created = make_pools(ws, e)
    assert all(f"work pool {pool}: created (process)" in created for pool in ("gpu", "cpu", "gpu-remote"))
    assert make_pools(ws, e).count(": exists") == 3  # a second run changes nothing
    prefect(["--no-prompt", "deploy", "--all"], ws, e)
    listed = prefect(["deployment", "ls"], ws, e)
    assert all(d in listed for d in ("finetune/nightly", "finetune/nightly-split", "finetune-stage/gpu",
                                     "finetune/nightly-remote"))

    deployments = {d["name"]: d for d in api(server["url"], "/deployments/filter", {})}
    deployment = deployments["nightly"]
    assert deployment["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
    assert deployment["schedules"][0]["active"]
    assert not deployments["nightly-split"]["schedules"][0]["active"]  # one nightly at a time
    assert not deployments["nightly-remote"]["schedules"][0]["active"]
    # The scheduler must create the nightly runs (it silently does not with SQLAlchemy 2.1).
    deadline = time.monotonic() + 60
    while not api(server["url"], "/flow_runs/filter",
                  {"flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}}):
        assert time.monotonic() < deadline, "no scheduled runs were created for the cron schedule"
        time.sleep(2)

    out = prefect(["deployment", "run", "finetune/nightly"], ws, e)
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
    # The worker runs the flow; meanwhile, while train runs, the browser loads its progress page.
    worker_log = server["home"] / "worker.log"
    with worker_log.open("w") as log:
        worker = subprocess.Popen(["prefect", "worker", "start", "--pool", "gpu", "--run-once"], cwd=ws,
                                  env=e, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            captured = CHROMIUM is None
            deadline = time.monotonic() + 900
            while worker.poll() is None:
                assert time.monotonic() < deadline, "the worker did not finish the nightly run"
                captured = captured or capture_running_progress(server, flow_run_id)
                time.sleep(0.5)
        finally:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGTERM)
                worker.wait(timeout=30)
    flow_run = api(server["url"], f"/flow_runs/{flow_run_id}")
    assert flow_run["state"]["type"] == "COMPLETED", worker_log.read_text()
    COMPLETED["id"], COMPLETED["name"], COMPLETED["ws"] = flow_run_id, flow_run["name"], str(ws)
    task_runs = api(server["url"], "/task_runs/filter",
                    {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    assert {t["name"] for t in task_runs} == set(STAGES)
    keys = {a["key"] for a in api(server["url"], "/artifacts/filter",
                                  {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})}
    assert {"scores-base-vs-tuned", "sample-predictions", "exported-model", "promotion",
            "train-progress", "train-status"} <= keys
    # The relay published train's status more than once while it ran (one table per relay).
    statuses = api(server["url"], "/artifacts/filter",
                   {"artifacts": {"key": {"any_": ["train-status"]}, "flow_run_id": {"any_": [flow_run_id]}}})
    steps = [(json.loads(a["data"]) if isinstance(a["data"], str) else a["data"])[0]["step"]
             for a in statuses]
    assert max(steps) == MAX_STEPS and any(0 < s < MAX_STEPS for s in steps), steps
    assert progress_artifact(server, flow_run_id)["data"] == 100
    evaluation = json.loads((ws / "metrics/eval.json").read_text())
    assert set(evaluation) == {"base", "tuned", "delta"}
    run(["dvc", "status"], ws)  # the worker left a consistent DVC workspace


@pytest.mark.skipif(CHROMIUM is None, reason=CHROMIUM_MISSING)
def test_ui_shows_the_deployment_and_the_completed_run(server):
    if not COMPLETED:
        pytest.skip("the nightly run did not complete (see the test above)")
    deployments = chromium(["--dump-dom", f"{server['ui']}/deployments"], server["home"])
    assert "nightly" in deployments and "finetune" in deployments
    run_page = f"{server['ui']}/runs/flow-run/{COMPLETED['id']}"
    dom = chromium(["--dump-dom", run_page], server["home"])
    assert COMPLETED["name"] in dom and "Completed" in dom
    SCREENSHOTS.mkdir(exist_ok=True)
    shot = SCREENSHOTS / "prefect-ui-nightly-run.png"
    chromium([f"--screenshot={shot}", run_page], server["home"])
    assert shot.is_file() and shot.stat().st_size > 0


@pytest.mark.skipif(CHROMIUM is None, reason=CHROMIUM_MISSING)
def test_ui_shows_train_progress_while_it_runs_and_when_done(server):
    if not COMPLETED:
        pytest.skip("the nightly run did not complete (see the test above)")
    # While train ran: the page showed its progress below 100% ("step N of MAX_STEPS", N < MAX_STEPS).
    assert RUNNING, "train's progress was never seen below 100% while the nightly run's train ran"
    assert float(RUNNING["after"]) < 100, (
        f"train finished ({RUNNING}) before the browser had loaded the progress page: "
        "raise NIGHTLY_PARAMS' max_steps")
    shown = [(int(n), int(m)) for n, m in STEP.findall(RUNNING["dom"])]
    assert shown and all(m == MAX_STEPS and n < m for n, m in shown), (shown, RUNNING["api_description"])
    assert Path(RUNNING["screenshot"]).stat().st_size > 0
    # Finished: the same artifact says 100% (step MAX_STEPS of MAX_STEPS); the latest
    # train-status table has the last step's loss, learning rate, tokens/s and ETA.
    progress = progress_artifact(server, COMPLETED["id"])
    page = f"{server['ui']}/artifacts/artifact/{progress['id']}"
    dom = chromium(["--dump-dom", page], server["home"])
    assert f"step {MAX_STEPS} of {MAX_STEPS}" in dom and "Progress: 100%" in dom
    shot = SCREENSHOTS / "prefect-ui-train-progress-done.png"
    chromium([f"--screenshot={shot}", page], server["home"])
    assert shot.is_file() and shot.stat().st_size > 0
    [status] = api(server["url"], "/artifacts/filter",
                   {"artifacts": {"key": {"any_": ["train-status"]}, "flow_run_id": {"any_": [COMPLETED["id"]]}},
                    "sort": "CREATED_DESC", "limit": 1})
    status_page = f"{server['ui']}/artifacts/artifact/{status['id']}"
    dom = chromium(["--dump-dom", status_page], server["home"])
    assert all(c in dom for c in ("loss", "learning_rate", "tokens_per_second", "eta")), dom[-3000:]
    shot = SCREENSHOTS / "prefect-ui-train-status.png"
    chromium([f"--screenshot={shot}", status_page], server["home"])
    assert shot.is_file() and shot.stat().st_size > 0


@pytest.mark.skipif(CHROMIUM is None, reason=CHROMIUM_MISSING)
def test_ui_shows_the_sweep_table(server):
    """A one-point sweep (`finetune(sweep=...)`) in the nightly run's workspace, against the
    real server: the `sweep` table artifact's page. The point is the nightly's own settings,
    so its experiment finds every stage up to date (tests/test_sweep.py runs real points)."""
    if not COMPLETED:
        pytest.skip("the nightly run did not complete (see the test above)")
    code = ("from flows.finetune import finetune; "
            f"assert finetune(sweep={{'train.max_steps': [{MAX_STEPS}]}}, return_state=True).is_completed()")
    proc = subprocess.run(["python", "-c", code], cwd=COMPLETED["ws"], env=server["env"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [sweep] = api(server["url"], "/artifacts/filter",
                  {"artifacts": {"key": {"any_": ["sweep"]}}, "sort": "CREATED_DESC", "limit": 1})
    page = f"{server['ui']}/artifacts/artifact/{sweep['id']}"
    dom = chromium(["--dump-dom", page], server["home"])
    assert "train.max_steps" in dom and "best" in dom, dom[-3000:]
    shot = SCREENSHOTS / "prefect-ui-sweep.png"
    chromium([f"--screenshot={shot}", page], server["home"])
    assert shot.is_file() and shot.stat().st_size > 0
