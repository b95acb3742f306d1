"""Past one machine, for real: a Prefect server on PostgreSQL (Debian's package, on
loopback), a `cpu` and a `gpu` process pool with one worker each, each worker in its own
clone, and a local directory as the DVC remote between the clones.

The `nightly-split` deployment runs prepare and tokenize in clone A (the cpu pool), sends
train to the `finetune-stage/gpu` deployment, which runs it in clone B and pushes the
adapter, and finishes evaluate, export and promote in clone A from the remote.

With train.num_nodes: 2 the same split run sends train to two `gpu` workers at once, one
node each, which train together (test_train_on_two_nodes_through_the_gpu_pool, on SQLite)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from .conftest import TINY_PARAMS, env, make_workspace, merge, run
from .test_deployment import api, free_port, prefect, prefect_server

# A runner end to end: skipped by `make test-fast`.
pytestmark = pytest.mark.e2e

PG_BIN = Path("/usr/lib/postgresql")
WORKER_TIMEOUT = 900
NODE_RUNS_END_S = 180  # a node run the freed worker took: it stops on the closed meeting


def _postgres_bin() -> Path | None:
    found = sorted(PG_BIN.glob("*/bin/pg_ctl"))
    return found[-1].parent if found else None


def _as_postgres_user() -> list[str]:
    # initdb refuses to run as root; Debian's package creates the `postgres` user for this.
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@pytest.fixture(scope="module")
def postgres():
    pg = _postgres_bin()
    if pg is None:
        pytest.skip("PostgreSQL is not installed (make test installs Debian's postgresql where "
                    "apt-get can run as root)")
    # Not under pytest's temporary tree: that is private to root, and the server runs as
    # the postgres user.
    data = Path(tempfile.mkdtemp(prefix="finetune-pg-"))
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    port = free_port()
    as_pg = _as_postgres_user()
    try:
        for cmd in ([str(pg / "initdb"), "-D", str(data), "--auth=trust", "-U", "prefect"],
                    [str(pg / "pg_ctl"), "-D", str(data), "-l", str(data / "server.log"),
                     "-o", f"-h 127.0.0.1 -p {port} -k {data}", "-w", "start"]):
            proc = subprocess.run([*as_pg, *cmd], capture_output=True, text=True)
            assert proc.returncode == 0, f"{cmd[0]}:\n{proc.stdout}\n{proc.stderr}"
        subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "-d",
                        "postgres", "-c", "CREATE DATABASE prefect"], check=True, capture_output=True)
        yield {"url": f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect", "port": port}
    finally:
        subprocess.run([*as_pg, str(pg / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
                       capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
def pg_server(postgres, tmp_path_factory):
    with prefect_server(tmp_path_factory.mktemp("prefect-home-pg"),
                        PREFECT_API_DATABASE_CONNECTION_URL=postgres["url"]) as s:
        yield {**s, "postgres": postgres}


def _stop(worker: subprocess.Popen) -> None:
    """Stops a `prefect worker` started in its own session."""
    os.killpg(worker.pid, signal.SIGTERM)
    try:
        worker.wait(timeout=60)
    except subprocess.TimeoutExpired:
        # Seen on a loaded 2-core machine: the worker's graceful shutdown outlasted a minute
        # after its run had completed. Its exit is not what these tests check.
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=60)


def test_split_pools_exchange_artifacts_through_the_dvc_remote(pg_server, tmp_path_factory,
                                                               tiny_model):
    remote = tmp_path_factory.mktemp("dvc-remote")
    clones = {}
    for name in ("a", "b"):
        ws = make_workspace(tmp_path_factory.mktemp(f"clone-{name}"), tiny_model)
        run(["dvc", "remote", "add", "--local", "-d", "shared", str(remote)], ws)
        clones[name] = ws
    a, b = clones["a"], clones["b"]
    e = pg_server["env"]
    for pool in ("cpu", "gpu"):
        prefect(["work-pool", "create", pool, "--type", "process"], a, e)
    # Each deployment is made from the checkout its worker uses (prefect.yaml's pull step).
    prefect(["--no-prompt", "deploy", "--name", "nightly-split"], a, {**e, "PWD": str(a)})
    prefect(["--no-prompt", "deploy", "--name", "gpu"], b, {**e, "PWD": str(b)})

    out = prefect(["deployment", "run", "finetune/nightly-split"], a, e)
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
    # The gpu worker keeps polling: the train run it takes is created only once the parent
    # run reaches train.
    gpu_log = (b / "gpu-worker.log").open("w")
    gpu_worker = subprocess.Popen(["prefect", "worker", "start", "--pool", "gpu"], cwd=b,
                                  env={**e, "PREFECT_WORKER_QUERY_SECONDS": "2"}, stdout=gpu_log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        cpu_worker = subprocess.run(["prefect", "worker", "start", "--pool", "cpu", "--run-once"],
                                    cwd=a, env=e, capture_output=True, text=True,
                                    timeout=WORKER_TIMEOUT)
    finally:
        _stop(gpu_worker)
        gpu_log.close()
    gpu_out = (b / "gpu-worker.log").read_text()
    flow_run = api(pg_server["url"], f"/flow_runs/{flow_run_id}")
    assert flow_run["state"]["type"] == "COMPLETED", cpu_worker.stdout + cpu_worker.stderr + gpu_out

    # train ran in clone B only: A restored it from the remote, B never computed the rest.
    runs = api(pg_server["url"], "/flow_runs/filter", {})
    child = [r for r in runs if r.get("parent_task_run_id") and r["id"] != flow_run_id]
    assert len(child) == 1 and child[0]["state"]["type"] == "COMPLETED"
    assert (a / "artifacts/adapter/adapter_model.safetensors").is_file()
    assert (a / "metrics/eval.json").is_file() and not (b / "metrics/eval.json").exists()
    lock_a = yaml.safe_load((a / "dvc.lock").read_text())["stages"]
    lock_b = yaml.safe_load((b / "dvc.lock").read_text())["stages"]
    assert set(lock_b) == {"prepare", "tokenize", "train"}
    for stage in lock_b:
        assert lock_a[stage] == lock_b[stage], stage

    # B catches up from the remote alone (nothing recomputed but promote, which DVC never
    # caches) and both clones end with the same dvc.lock.
    caught_up = run(["dvc", "repro", "--pull"], b)
    ran = re.findall(r"Running stage '(\w+)'", caught_up.stdout + caught_up.stderr)
    assert ran == ["promote"], caught_up.stdout
    lock_b = yaml.safe_load((b / "dvc.lock").read_text())["stages"]
    assert lock_a == lock_b

    # The runs live in PostgreSQL.
    count = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(pg_server["postgres"]["port"]),
                            "-U", "prefect", "-d", "prefect", "-tAc", "SELECT count(*) FROM flow_run"],
                           capture_output=True, text=True, check=True).stdout
    assert int(count) >= 2
    assert json.loads((a / "metrics/promote.json").read_text())["promoted"] in (True, False)


def test_a_stage_expected_from_the_remote_is_never_computed_here(tmp_path, tiny_model):
    """The parent of a split run restores train from the remote; if the GPU worker's result
    is not there, it must fail with a message, not start training on the CPU host."""
    ws = make_workspace(tmp_path, tiny_model)
    run(["dvc", "repro", "tokenize"], ws)
    proc = subprocess.run(["dvc", "repro", "--single-item", "train"], cwd=ws,
                          env={**env(), "FINETUNE_RESTORE_ONLY": "train"}, capture_output=True,
                          text=True)
    assert proc.returncode != 0
    assert "train stage's result was to come from the DVC remote" in proc.stdout + proc.stderr
    assert not (ws / "artifacts/adapter").exists()


@pytest.fixture(scope="module")
def sqlite_server(tmp_path_factory):
    with prefect_server(tmp_path_factory.mktemp("prefect-home-nodes")) as s:
        yield s


def _own_mount_namespace() -> bool:
    return subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0


def _node_worker(checkout: Path, seen_at: Path, e: dict, log: Path) -> subprocess.Popen:
    """A `gpu` pool worker (one run at a time, as a GPU host runs one node) whose runs see
    `checkout` at `seen_at`: the deployment's pull step names one path, and on a cluster that
    path is each host's own checkout. Here a private mount namespace plays the other host."""
    cmd = ["prefect", "worker", "start", "--pool", "gpu", "--limit", "1"]
    if checkout != seen_at:
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount --bind "$0" "$1" && cd "$1" && shift && exec "$@"', str(checkout), str(seen_at), *cmd]
    return subprocess.Popen(cmd, cwd=seen_at, env={**e, "PREFECT_WORKER_QUERY_SECONDS": "2"},
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _parent_run(ws: Path, e: dict, **extra_env: str) -> subprocess.CompletedProcess[str]:
    """The `finetune` flow with train sent to `finetune-stage/gpu`, run in `ws` against the
    server (what the nightly-split deployment runs through a cpu worker)."""
    code = ("import json; from flows.finetune import finetune; print(json.dumps(finetune(remote=True, "
            "gpu_deployment='finetune-stage/gpu')))")
    return subprocess.run([sys.executable, "-c", code], cwd=ws, env={**e, **extra_env}, capture_output=True,
                          text=True, timeout=WORKER_TIMEOUT)


def _node_runs(server: dict, parent: str) -> list[dict]:
    return [r for r in api(server["url"], "/flow_runs/filter", {})
            if r["name"].startswith(f"{parent}-train-node-")]


def test_train_on_two_nodes_through_the_gpu_pool(sqlite_server, tmp_path_factory, tiny_model):
    """train.num_nodes: 2 in a split run: the flow hosts the rendezvous and submits one
    `finetune-stage/gpu` run per node; two workers (`--limit 1`), each with its own checkout,
    train together and each pushes the same adapter. First with one worker only: the node
    that started gives up after FINETUNE_RDZV_TIMEOUT, the other run is cancelled before any
    worker takes it, and the stage fails with one line naming the count."""
    if not _own_mount_namespace():
        pytest.skip("needs `unshare --mount` (root) to give the second worker its own checkout")
    remote = tmp_path_factory.mktemp("dvc-remote-nodes")
    nodes = {"train": {"num_nodes": 2, "padding_free": False, "per_device_train_batch_size": 2}}
    clones = {}
    for name in ("parent", "node-a", "node-b"):
        ws = make_workspace(tmp_path_factory.mktemp(name), tiny_model, merge(TINY_PARAMS, nodes))
        run(["dvc", "remote", "add", "--local", "-d", "shared", str(remote)], ws)
        clones[name] = ws
    parent, node_a, node_b = clones["parent"], clones["node-a"], clones["node-b"]
    e = sqlite_server["env"]
    prefect(["work-pool", "create", "gpu", "--type", "process"], node_a, e)
    prefect(["--no-prompt", "deploy", "--name", "gpu"], node_a, {**e, "PWD": str(node_a)})

    worker_a = _node_worker(node_a, node_a, e, node_a / "worker.log")
    try:
        alone = _parent_run(parent, e, FINETUNE_RDZV_TIMEOUT="8")
        assert alone.returncode != 0, alone.stdout
        err = alone.stdout + alone.stderr
        assert re.search(r"train.num_nodes is 2, but 1 of the 2 finetune-stage/gpu runs had not started "
                         r"when [\w-]+-train-node-\d gave up \(cancelled: ", err), err
        assert "its work pool needs 2 workers free at once, each started with `--limit 1`" in err
        assert "1 of the 2 nodes never joined the rendezvous" in err, err
        # No node run is left waiting: the one that failed, and the other cancelled (or, when
        # the freed worker took it in the same instant, stopped by itself or by its worker).
        parent_name = re.search(r"Beginning flow run '([^']+)'", err).group(1)
        deadline = time.monotonic() + NODE_RUNS_END_S
        while True:
            runs = _node_runs(sqlite_server, parent_name)
            if all(r["state"]["type"] in ("CANCELLED", "FAILED", "CRASHED") for r in runs):
                break
            assert time.monotonic() < deadline, runs
            time.sleep(1)
        assert len(runs) == 2 and "FAILED" in [r["state"]["type"] for r in runs], runs
        assert not (parent / "artifacts/adapter").exists()

        worker_b = _node_worker(node_b, node_a, e, node_b / "worker.log")
        try:
            both = _parent_run(parent, e, FINETUNE_RDZV_TIMEOUT="300")
        finally:
            _stop(worker_b)
    finally:
        _stop(worker_a)
    logs = (node_a / "worker.log").read_text() + (node_b / "worker.log").read_text()
    assert both.returncode == 0, both.stdout + both.stderr + logs
    summary = json.loads(both.stdout.strip().splitlines()[-1])
    assert summary["stages"]["train"]["status"] == "ran on 2 nodes of finetune-stage/gpu"
    for ws in (node_a, node_b):  # each worker ran one node of the run to the end
        assert re.search(r"Flow run '[\w-]+-train-node-\d' - Finished in state Completed\(\)",
                         (ws / "worker.log").read_text()), logs

    # Each node trained in its own checkout and wrote the same bytes; the parent restored them.
    adapter = "artifacts/adapter/adapter_model.safetensors"
    assert (node_a / adapter).read_bytes() == (node_b / adapter).read_bytes() == (parent / adapter).read_bytes()
    assert json.loads((parent / "metrics/train.json").read_text())["steps"] == TINY_PARAMS["train"]["max_steps"]
    locks = [yaml.safe_load((ws / "dvc.lock").read_text())["stages"]["train"] for ws in (parent, node_a, node_b)]
    assert locks[0] == locks[1] == locks[2]
    assert (parent / "metrics/eval.json").is_file()
