"""Every shipped example runs the way the README says (issue 24, item 5): copied over
params.yaml in a copy of the repository's tracked files, `finetune check` accepts it and DVC
finds every params key that dvc.yaml names.

DVC reads params.yaml itself, key by key, and knows nothing of the defaults in tasks/config/:
a key listed under a stage's `params:` that the file lacks stops `dvc repro` before the
stage's command runs (DVC hashes the stage's params to look it up in its run cache:
`Parameters '...' are missing from 'params.yaml'`). So params.yaml, and each example, sets
every key dvc.yaml names, and `finetune check` refuses a file that does not
(tasks/config/loading.py: check_dvc_params). This module holds both sides to that, with
DVC's own code: no stage runs, and the examples' Hub models and datasets are never fetched
(`finetune check` does not contact the Hub).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import REPO, finetune, run, shipped_params
from .test_lock import tracked_copy

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def dvc_yaml_params() -> dict[str, list[str]]:
    """params.yaml key -> the dvc.yaml stages that list it under `params:`, in dvc.yaml's order."""
    readers: dict[str, list[str]] = {}
    for name, spec in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        for key in spec.get("params") or []:
            assert isinstance(key, str), f"{name}: params from another file than params.yaml: {key}"
            readers.setdefault(key, []).append(name)
    return readers


def dvc_refusals(ws: Path, repo: Any = None) -> dict[str, str]:
    """Stage -> DVC's error for each stage whose params DVC cannot read from ws/params.yaml
    (`repo`: a dvc.repo.Repo open on ws, to reuse). `ParamsDependency.get_hash` is what
    `dvc repro` calls on a stage's params before running it (the run-cache lookup) and after
    (writing dvc.lock); it reads the file on each call and raises MissingParamsError."""
    from dvc.dependency.param import MissingParamsError, ParamsDependency
    from dvc.repo import Repo

    if repo is None:
        with Repo(str(ws)) as opened:
            return dvc_refusals(ws, opened)
    refused = {}
    for stage in repo.index.stages:
        for dep in stage.deps:
            if isinstance(dep, ParamsDependency):
                try:
                    dep.get_hash()
                except MissingParamsError as err:
                    refused[stage.name] = str(err)
    return refused


def deleted_in_status(ws: Path) -> dict[str, list[str]]:
    """Stage -> the params.yaml keys `dvc status` reports as deleted (missing from the file)."""
    status = json.loads(run(["dvc", "status", "--json"], ws).stdout or "{}")
    out: dict[str, list[str]] = {}
    for stage, changes in status.items():
        for change in changes:
            if isinstance(change, dict):
                keys = (change.get("changed deps") or {}).get("params.yaml") or {}
                if isinstance(keys, dict):
                    out[stage] = out.get(stage, []) + [k for k, v in keys.items() if v == "deleted"]
    return {stage: keys for stage, keys in out.items() if keys}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """The repository's tracked files (as in the working tree) in a fresh git repo."""
    return tracked_copy(tmp_path_factory.mktemp("examples"))


@pytest.fixture
def params_file(ws):
    """ws/params.yaml, restored after the test."""
    path = ws / "params.yaml"
    before = path.read_bytes()
    yield path
    path.write_bytes(before)


def test_there_are_examples_and_dvc_yaml_names_params():
    assert EXAMPLES and dvc_yaml_params()


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_an_example_copied_over_params_yaml_is_what_check_and_dvc_accept(ws, params_file, example):
    shutil.copyfile(example, params_file)
    checked = finetune(ws, "check")
    assert checked.returncode == 0, checked.stderr
    assert "params.yaml: OK" in checked.stdout
    assert dvc_refusals(ws) == {}
    assert deleted_in_status(ws) == {}


def _without(raw: dict[str, Any], key: str) -> dict[str, Any]:
    raw = json.loads(json.dumps(raw))
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node[part]
    del node[leaf]
    return raw


def test_check_refuses_exactly_what_dvc_refuses(ws, params_file):
    """The issue's failure, key by key: the shipped params.yaml without one key dvc.yaml names.
    `finetune check` refuses it naming the key (check_dvc_params, or the schema where the key
    has no default), and DVC refuses exactly the stages that name the key or a key under it.
    The shipped file passes both."""
    from dvc.repo import Repo

    named = dvc_yaml_params()
    by_stage: dict[str, list[str]] = {}
    for key, stages in named.items():
        for stage in stages:
            by_stage.setdefault(stage, []).append(key)
    problems = []
    repo = Repo(str(ws))  # get_hash reads params.yaml on each call
    for key in named:
        params_file.write_text(yaml.safe_dump(_without(shipped_params(), key), sort_keys=False))
        checked = finetune(ws, "check")
        if checked.returncode != 2 or f"  - {key}: " not in checked.stderr:
            problems.append(f"{key}: finetune check exited {checked.returncode}: "
                            f"{(checked.stderr or checked.stdout).strip()[-300:]}")
        # A section's removal takes its keys along: the stages naming any of them are refused.
        reading = [s for s, keys in by_stage.items()
                   if any(k == key or k.startswith(f"{key}.") for k in keys)]
        refused = dvc_refusals(ws, repo)
        if sorted(refused) != sorted(reading):
            problems.append(f"{key}: dvc.yaml's {reading} read it or keys under it, DVC refused {refused}")
    repo.close()
    params_file.write_text(yaml.safe_dump(shipped_params(), sort_keys=False))
    assert finetune(ws, "check").returncode == 0
    assert dvc_refusals(ws) == {}
    assert not problems, "\n".join(problems)
