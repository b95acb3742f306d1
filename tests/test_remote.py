"""The `nightly-remote` deployment for real: a worker on a host with no checkout. A bare git
repository and a local directory stand in for the hosted repository and DVC remote; the
worker starts in an empty directory, and the run's pull steps clone the branch, install it
with `make setup` and `dvc pull` the outputs the commit's dvc.lock records. The clone's
dvc.lock must then equal that of the `dvc repro` that produced the commit. The registry
lives outside the clone (FINETUNE_REGISTRY, from the finetune_registry variable) and holds a
champion the run's model does not beat: it stays the champion."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

from pathlib import Path

import pytest
import yaml

from tasks.workspace import REGISTRY_ENV

from .conftest import TINY_PARAMS, make_workspace, merge, run, shipped_params
from .test_deployment import api, make_pools, prefect, prefect_server

# A runner end to end: skipped by `make test-fast`.
pytestmark = pytest.mark.e2e

WORKER_TIMEOUT = 900
BRANCH = "nightly"
CACHED = ("prepare", "tokenize", "train", "align", "evaluate", "export")  # pulled, not recomputed


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with prefect_server(tmp_path_factory.mktemp("prefect-home-remote")) as s:
        yield s


def test_a_worker_without_a_checkout_clones_installs_and_pulls(server, tmp_path_factory, tiny_model):
    # What the team's repository and DVC remote hold: a commit whose dvc.lock comes from a
    # local `dvc repro`, the remote set as the default in the committed .dvc/config, and
    # the outputs (and run cache) pushed.
    # min_gain -1: this first run promotes, so there is a model to make the champion of.
    ws = make_workspace(tmp_path_factory.mktemp("source"), tiny_model,
                        merge(TINY_PARAMS, {"promote": {"min_gain": -1.0}}))
    remote = tmp_path_factory.mktemp("dvc-remote")
    run(["dvc", "remote", "add", "-d", "storage", str(remote)], ws)
    run(["dvc", "repro"], ws)
    # The registry the GPU host keeps across runs, holding last night's champion: the
    # model just promoted, its stored test answers (and their scores) made perfect so nothing
    # can beat it.
    kept = tmp_path_factory.mktemp("kept-registry")
    pointer = json.loads((ws / "registry/latest.json").read_text())
    champion = kept / Path(pointer["path"]).name
    shutil.copytree(ws / pointer["path"], champion)
    answers = [json.loads(line) for line in (champion / "predictions.jsonl").read_text().splitlines()]
    (champion / "predictions.jsonl").write_text(
        "".join(json.dumps({**a, "prediction": a["reference"], "score": 1.0}) + "\n" for a in answers))
    (kept / "latest.json").write_text(json.dumps({**pointer, "path": str(champion)}))
    kept_latest = (kept / "latest.json").read_text()
    # The commit's promote ran against that registry too (with the shipped min_gain), so the
    # clone's dvc.lock can equal it.
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["promote"]["min_gain"] = shipped_params()["promote"]["min_gain"]
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.rmtree(ws / "registry")
    run(["dvc", "repro", "-f", "-s", "promote"], ws, extra_env={REGISTRY_ENV: str(kept)})
    run(["dvc", "push", "--run-cache"], ws)
    run(["git", "add", "-A"], ws)
    run(["git", "commit", "-qm", "dvc repro"], ws)
    commit = run(["git", "rev-parse", "HEAD"], ws).stdout.strip()
    bare = tmp_path_factory.mktemp("hosted") / "finetune.git"
    run(["git", "init", "-q", "--bare", str(bare)], ws)
    run(["git", "push", "-q", str(bare), f"HEAD:refs/heads/{BRANCH}"], ws)

    e = server["env"]
    prefect(["variable", "set", "finetune_repo_url", bare.as_uri()], ws, e)
    prefect(["variable", "set", "finetune_repo_branch", BRANCH], ws, e)
    prefect(["variable", "set", "finetune_registry", str(kept)], ws, e)
    assert "work pool gpu-remote: created (process)" in make_pools(ws, e)
    prefect(["--no-prompt", "deploy", "--name", "nightly-remote"], ws, e)

    # The GPU host: an empty directory, for the worker and the run's working directory
    # (kept, unlike the worker's default temporary one, so the clone can be checked).
    host = tmp_path_factory.mktemp("gpu-host")
    out = prefect(["deployment", "run", "finetune/nightly-remote",
                   "--job-variable", f"working_dir={host}"], host, e)
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
    worker = subprocess.run(["prefect", "worker", "start", "--pool", "gpu-remote", "--run-once"],
                            cwd=host, env=e, capture_output=True, text=True, timeout=WORKER_TIMEOUT)
    flow_run = api(server["url"], f"/flow_runs/{flow_run_id}")
    assert flow_run["state"]["type"] == "COMPLETED", worker.stdout + worker.stderr

    [clone] = [p.parent for p in host.glob("*/dvc.lock")]
    assert run(["git", "rev-parse", "HEAD"], clone).stdout.strip() == commit
    assert (clone / ".venv/bin/finetune").is_file()  # `make setup` ran in the clone
    # The pulled outputs were up to date: only promote (never cached by DVC) ran.
    task_runs = api(server["url"], "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    states = {t["name"]: t["state"]["name"] for t in task_runs}
    assert {s: states[s] for s in CACHED} == dict.fromkeys(CACHED, "Skipped"), states
    assert states["promote"] == "Completed"
    assert yaml.safe_load((clone / "dvc.lock").read_text()) == yaml.safe_load((ws / "dvc.lock").read_text())
    # The champion came from the kept registry, its stored answers reused, and it stays.
    decision = json.loads((clone / "metrics/promote.json").read_text())
    assert decision["champion"] == {"model": str(champion), "score": 1.0, "predictions": "reused"}
    assert not decision["promoted"] and "the champion stays current" in decision["reason"]
    assert (kept / "latest.json").read_text() == kept_latest
    assert not (clone / "registry/latest.json").exists()  # nothing went into the clone's own
