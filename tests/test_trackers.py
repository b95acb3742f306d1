"""train.report_to: the Trainer logs to real trackers, all offline: TensorBoard event files,
an MLflow file store and DVCLive's files, each read back with the tracker's own reader."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tasks import paths, train
from tasks.config import parse_params
from tasks.errors import ConfigError, PipelineError

from .conftest import REPO, TINY_PARAMS, merge, shipped_params, tokenized_dir

STEPS = TINY_PARAMS["train"]["max_steps"]
LEARNING_RATE = parse_params(merge(shipped_params(), TINY_PARAMS), "params.yaml").train.learning_rate


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_model) -> Path:
    return tokenized_dir(tmp_path_factory.mktemp("trackers"), tiny_model,
                         merge(shipped_params(), TINY_PARAMS))


def train_with(root: Path, monkeypatch, report_to: list[str]) -> dict:
    monkeypatch.chdir(root)
    raw = merge(yaml.safe_load((root / "params.yaml").read_text()), {"train": {"report_to": report_to}})
    return train.run(parse_params(raw, "params.yaml"))


def test_tensorboard_gets_the_loss_curve(root, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_with(root, monkeypatch, ["tensorboard"])
    (run,) = (root / paths.TRACKERS / "tensorboard").iterdir()
    assert run.name.startswith("train-")
    events = EventAccumulator(str(run))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, STEPS + 1))
    logged = [float(row.split("\t")[1]) for row in (root / paths.TRAIN_LOG).read_text().splitlines()[1:]]
    assert [e.value for e in loss] == pytest.approx(logged)
    assert "train/learning_rate" in events.Tags()["scalars"]


def test_mlflow_run_has_params_and_loss_history(root, monkeypatch, tmp_path):
    from mlflow import MlflowClient

    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a file store otherwise
    train_with(root, monkeypatch, ["mlflow"])
    client = MlflowClient(tracking_uri=store)
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
    assert train.trackers(params, "train-x") == (["mlflow"], [])
    with mlflow.start_run(run_name="train-x"):
        mlflow.log_metric("loss", 1.0, step=1)
    assert (tmp_path / "mlruns/mlflow.db").is_file()


def test_dvclive_writes_its_plots_and_leaves_dvc_yaml_alone(root, monkeypatch):
    dvc_yaml = root / "dvc.yaml"
    dvc_yaml.write_text("stages: {}\n")
    train_with(root, monkeypatch, ["dvclive"])
    live = root / paths.TRACKERS / "dvclive"
    rows = (live / "plots/metrics/loss.tsv").read_text().splitlines()
    assert rows[0] == "step\tloss" and len(rows) == STEPS + 1  # DVCLive counts steps from 0
    assert "learning_rate" in yaml.safe_load((live / "params.yaml").read_text())
    assert dvc_yaml.read_text() == "stages: {}\n"
    assert not (live / "dvc.yaml").exists()


def test_align_logs_dpo_to_the_same_trackers(root, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tasks import align

    if not (root / paths.ADAPTER).is_dir():
        train_with(root, monkeypatch, [])
    shutil.copy(REPO / "data/raw/preferences.jsonl", root / "data/raw/preferences.jsonl")
    monkeypatch.chdir(root)
    raw = merge(yaml.safe_load((root / "params.yaml").read_text()),
                {"train": {"report_to": ["tensorboard"]}, "align": {"enabled": True, "max_steps": 2}})
    align.run(parse_params(raw, "params.yaml"))
    (run,) = (root / paths.TRACKERS / "tensorboard").glob("align-*")
    events = EventAccumulator(str(run))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]


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
    with pytest.raises(PipelineError, match=r"train\.report_to lists wandb but the wandb package"):
        train_with(root, monkeypatch, ["wandb"])
