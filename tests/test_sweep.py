"""The flow's `sweep` parameter under prefect_test_harness: a 2-point grid, each point a DVC
experiment (run up to evaluate), one table artifact comparing them, and each point restored
by its experiment name."""

from __future__ import annotations

import json

import pytest
import yaml

from tasks.errors import ConfigError

from .conftest import REPO, run
from .test_flow import artifact, harness, task_runs, ws  # noqa: F401 (fixtures)

# A runner end to end: skipped by `make test-fast`.
pytestmark = pytest.mark.e2e

GRID = {"train.learning_rate": [1e-3, 3e-3]}


def test_the_points_are_the_grid_product_each_checked_like_params_yaml():
    from flows.finetune import sweep_points

    params = REPO / "params.yaml"
    assert sweep_points({"train.learning_rate": [1e-4, 2e-4], "lora.r": [8, 16]}, params) == [
        {"train.learning_rate": 1e-4, "lora.r": 8}, {"train.learning_rate": 1e-4, "lora.r": 16},
        {"train.learning_rate": 2e-4, "lora.r": 8}, {"train.learning_rate": 2e-4, "lora.r": 16}]
    with pytest.raises(ValueError, match="train.learning_rate: needs a non-empty list"):
        sweep_points({"train.learning_rate": 1e-4}, params)
    with pytest.raises(ConfigError, match="lora.r: Input should be greater than or equal to 1"):
        sweep_points({"lora.r": [8, -1]}, params)


def test_a_bad_grid_fails_before_any_experiment(ws):  # noqa: F811
    from flows.finetune import finetune

    state = finetune(sweep={"train.learnin_rate": [1e-3]}, return_state=True)
    assert state.is_failed()
    with pytest.raises(ConfigError, match="learnin_rate"):
        state.result()
    assert task_runs(state) == []
    assert run(["dvc", "exp", "ls", "--name-only"], ws).stdout.strip() == ""


def test_each_point_runs_as_a_dvc_experiment_and_one_table_compares_them(ws):  # noqa: F811
    from flows.finetune import finetune

    state = finetune(sweep=GRID, return_state=True)
    assert state.is_completed()
    summary = state.result()
    rows = summary["sweep"]
    names = [r["experiment"] for r in rows]
    assert [r["train.learning_rate"] for r in rows] == GRID["train.learning_rate"]
    assert [r.name for r in task_runs(state)] == names  # one task per point, in order

    table = artifact("sweep")
    published = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert published == rows
    assert set(rows[0]) == {"experiment", "train.learning_rate", "rougeL", "rougeL_ci95", "train_loss",
                            "wall_time_s", "best"}
    [best] = [r for r in rows if r["best"] == "best"]
    assert best["rougeL"] == max(r["rougeL"] for r in rows) and summary["best"] == best["experiment"]
    assert all(r["train_loss"] > 0 and r["wall_time_s"] > 0 for r in rows)
    assert sorted(run(["dvc", "exp", "ls", "--name-only"], ws).stdout.split()) == sorted(names)
    assert not (ws / "metrics/export.json").exists()  # a sweep stops at evaluate

    # Each point stays reproducible by its name: its params and results come back. (DVC
    # also reports export's and promote's outputs missing and exits non-zero: this test's
    # baseline commit never ran those stages.)
    first = rows[0]
    run(["dvc", "exp", "apply", first["experiment"]], ws, check=False)
    assert yaml.safe_load((ws / "params.yaml").read_text())["train"]["learning_rate"] == first["train.learning_rate"]
    assert json.loads((ws / "metrics/train.json").read_text())["train_loss"] == first["train_loss"]
    assert json.loads((ws / "metrics/eval.json").read_text())["tuned"]["rougeL"]["mean"] == first["rougeL"]
    assert rows[0]["train_loss"] != rows[1]["train_loss"]  # the two points really differ
