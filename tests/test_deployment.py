"""The nightly deployment for real: a `prefect server` on 127.0.0.1, the `gpu` process pool,
`prefect deploy --all` from prefect.yaml, `prefect deployment run finetune/nightly`, and a
worker that runs it to Completed. Every process started here is stopped at the end."""

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

from .conftest import CHROMIUM, CHROMIUM_MISSING, REPO, chromium, env, make_workspace, run

SERVER_START_TIMEOUT = 120
SCREENSHOTS = REPO / "test-artifacts"
COMPLETED: dict[str, str] = {}  # flow run id of the nightly run, for the UI check


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


def test_nightly_deployment_runs_on_a_gpu_pool_worker(server, tmp_path_factory, tiny_model):
    ws = make_workspace(tmp_path_factory.mktemp("deploy"), tiny_model)
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
    worker = subprocess.run(["prefect", "worker", "start", "--pool", "gpu", "--run-once"], cwd=ws,
                            env=e, capture_output=True, text=True, timeout=900)
    flow_run = api(server["url"], f"/flow_runs/{flow_run_id}")
    assert flow_run["state"]["type"] == "COMPLETED", worker.stdout + worker.stderr
    COMPLETED["id"], COMPLETED["name"] = flow_run_id, flow_run["name"]
    task_runs = api(server["url"], "/task_runs/filter",
                    {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    assert {t["name"] for t in task_runs} == {"prepare", "tokenize", "train", "align", "evaluate",
                                              "export", "promote"}
    keys = {a["key"] for a in api(server["url"], "/artifacts/filter",
                                  {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})}
    assert {"scores-base-vs-tuned", "sample-predictions", "exported-model", "promotion"} <= keys
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
