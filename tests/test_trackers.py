"""train.report_to: the Trainer logs to real trackers, all offline: TensorBoard event files,
an MLflow file store and DVCLive's files, each read back with the tracker's own reader.
align's DPO run reports to the same trackers: test_align.py reads its TensorBoard events."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tasks.config import parse_params
from tasks.errors import ConfigError, PipelineError
from tasks.training import trackers
from tasks.workspace import Workspace

from .conftest import TINY_PARAMS, copy_workspace, merge, shipped_params, stage

WS = Workspace()  # the file contract, relative to a workspace's root

STEPS = TINY_PARAMS["train"]["max_steps"]
LEARNING_RATE = parse_params(merge(shipped_params(), TINY_PARAMS), "params.yaml").train.learning_rate


@pytest.fixture(scope="module")
def root(tmp_path_factory, trained_workspace) -> Path:
    """Prepared and tokenized with TINY_PARAMS (and trained without trackers): the session's
    workspace, copied."""
    return copy_workspace(trained_workspace, tmp_path_factory.mktemp("trackers") / "ws")


@pytest.fixture(scope="module")
def logged(root, tmp_path_factory) -> Path:
    """One training run reporting to TensorBoard, MLflow (a file store the environment names)
    and DVCLive at once, with dvc.yaml replaced by a marker DVCLive must leave alone; returns
    the MLflow store. A run costs as much with three trackers as with one."""
    store = tmp_path_factory.mktemp("mlflow") / "mlruns"
    (root / "dvc.yaml").write_text("stages: {}\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", store.as_uri())
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a file store otherwise
        mp.chdir(root)
        raw = merge(yaml.safe_load((root / "params.yaml").read_text()),
                    {"train": {"report_to": ["tensorboard", "mlflow", "dvclive"]}})
        stage("train", parse_params(raw, "params.yaml"))
    return store


def test_tensorboard_gets_the_loss_curve(root, logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = (root / WS.trackers / "tensorboard").iterdir()
    assert run.name.startswith("train-")
    events = EventAccumulator(str(run))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, STEPS + 1))
    logged_loss = [float(row.split("\t")[1]) for row in (root / WS.train_log).read_text().splitlines()[1:]]
    assert [e.value for e in loss] == pytest.approx(logged_loss)
    assert "train/learning_rate" in events.Tags()["scalars"]


def test_mlflow_run_has_params_and_loss_history(root, logged):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=logged.as_uri())
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert run.info.run_name.startswith("train-")
    assert float(run.data.params["learning_rate"]) == LEARNING_RATE
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    assert "eval_loss" in run.data.metrics  # the evaluation after training joins the same run
    assert not (root / "mlruns").exists()  # the environment's store, not the default


def test_mlflow_defaults_to_a_sqlite_store_under_mlruns(monkeypatch, tmp_path):
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = parse_params(merge(shipped_params(), {"train": {"report_to": ["mlflow"]}}), "params.yaml")
    assert trackers(params, "train-x", WS) == (["mlflow"], [])
    with mlflow.start_run(run_name="train-x"):
        mlflow.log_metric("loss", 1.0, step=1)
    assert (tmp_path / "mlruns/mlflow.db").is_file()


def test_dvclive_writes_its_plots_and_leaves_dvc_yaml_alone(root, logged):
    live = root / WS.trackers / "dvclive"
    rows = (live / "plots/metrics/loss.tsv").read_text().splitlines()
    assert rows[0] == "step\tloss" and len(rows) == STEPS + 1  # DVCLive counts steps from 0
    assert "learning_rate" in yaml.safe_load((live / "params.yaml").read_text())
    assert (root / "dvc.yaml").read_text() == "stages: {}\n"
    assert not (live / "dvc.yaml").exists()


def test_unknown_tracker_is_one_message_naming_the_key_and_choices():
    raw = merge(shipped_params(), {"train": {"report_to": ["tensorbord"]}})
    with pytest.raises(ConfigError) as err:
        parse_params(raw, "params.yaml")
    assert len(err.value.problems) == 1
    message = str(err.value)
    assert "train.report_to" in message and "tensorbord" in message
    assert all(name in message for name in ("tensorboard", "mlflow", "wandb", "dvclive"))


def test_tracker_without_its_package_names_the_package(root, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    monkeypatch.chdir(root)
    raw = merge(yaml.safe_load((root / "params.yaml").read_text()), {"train": {"report_to": ["wandb"]}})
    with pytest.raises(PipelineError, match=r"train\.report_to lists wandb but the wandb package"):
        stage("train", parse_params(raw, "params.yaml"))
