"""train.eval_steps, early stopping and the best checkpoint: on a planted plateau (a learning
rate so small that no weight the validation loss sees moves) a run stops before max_steps and
its adapter is the best step's checkpoint, saved although step 1 is not one of save_steps; a
run killed after the checkpoint of the step that stopped it, rerun, stops at the same step
with the same adapter bytes and metric files.

All in this process, on the tiny model."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml

from tasks.config import parse_params

from .conftest import TINY_PARAMS, merge, shipped_params, stage, tokenized_dir

MAX_STEPS = 8
PATIENCE = 3
SAVE_STEPS = 2  # the best, step 1, is saved because it is the best
# lr 1e-30 moves LoRA's B (zero at the start) to about 1e-30: the adapter's bytes change at
# every step, its effect on the logits is far below float32 rounding, so the validation loss
# is flat from the first evaluation. The threshold makes the count immune to rounding noise.
PLATEAU = {"max_steps": MAX_STEPS, "learning_rate": 1.0e-30, "warmup_steps": 0,
           "eval_steps": 1, "save_steps": SAVE_STEPS, "save_total_limit": MAX_STEPS,
           "early_stopping_patience": PATIENCE, "early_stopping_threshold": 1.0e-6}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread (as in test_train_resume.py): faster on a busy 2-core host."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model) -> Path:
    raw = merge(shipped_params(), merge(TINY_PARAMS, {"train": PLATEAU}))
    return tokenized_dir(tmp_path_factory.mktemp("plateau"), tiny_model, raw)


def params_of(ws: Path):
    return parse_params(yaml.safe_load((ws / "params.yaml").read_text()), "params.yaml")


def outputs(ws: Path) -> dict[str, bytes]:
    return {name: (ws / name).read_bytes() for name in (
        "artifacts/adapter/adapter_model.safetensors", "metrics/train.json", "metrics/train_log.tsv",
        "metrics/eval_log.tsv")}


@pytest.fixture(scope="module")
def plateau(ws) -> dict[str, bytes]:
    """One uninterrupted run, its checkpoints kept (train removes them once the adapter is
    saved) for the tests to compare with and resume from."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("tasks.train.clear_checkpoints", lambda *args, **kwargs: None)
        stage("train", params_of(ws), ws)
    return outputs(ws)


def test_a_plateau_stops_early_with_the_best_checkpoint(ws, plateau):
    metrics = json.loads(plateau["metrics/train.json"])
    # Step 1 sets the best; steps 2 to 4 do not beat it: patience 3 runs out at step 4.
    assert metrics["stopped_early"] is True
    assert metrics["steps"] == 1 + PATIENCE < MAX_STEPS
    assert metrics["best_step"] == 1
    assert metrics["best_metric"] == pytest.approx(metrics["eval_loss"])
    checkpoints = ws / "artifacts/checkpoints"
    # save_steps 2 saves 2 and 4 (where the run stopped); 1 is saved for being the best.
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == [
        "checkpoint-1", "checkpoint-2", "checkpoint-4"]
    best = (checkpoints / f"checkpoint-{metrics['best_step']}/adapter_model.safetensors").read_bytes()
    last = (checkpoints / "checkpoint-4/adapter_model.safetensors").read_bytes()
    assert plateau["artifacts/adapter/adapter_model.safetensors"] == best
    assert best != last  # the weights did move: the adapter is the best step's, not the last's


def test_validation_loss_is_logged_at_the_eval_steps(ws, plateau):
    rows = list(csv.DictReader(plateau["metrics/train_log.tsv"].decode().splitlines(), delimiter="\t"))
    assert list(rows[0]) == ["step", "loss", "learning_rate", "tokens_seen", "eval_loss"]
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert all(float(r["eval_loss"]) > 0 and float(r["loss"]) > 0 for r in rows)
    # the same losses, alone, for dvc plots
    assert plateau["metrics/eval_log.tsv"].decode().splitlines() == [
        "step\teval_loss", *(f"{r['step']}\t{r['eval_loss']}" for r in rows)]
    progress = json.loads((ws / "reports/progress.json").read_text())
    assert progress["eval_step"] == 4 and progress["eval_loss"] == float(rows[-1]["eval_loss"])


def test_a_run_killed_at_its_stop_resumes_to_the_same_adapter(ws, plateau, caplog):
    """Killed after checkpoint-4 (saved as early stopping ended the run) was written, before
    the adapter: the rerun drops checkpoint-4 (the Trainer would train on from it), resumes from
    checkpoint-2 with the best so far (step 1) and the patience count it saved (1), and stops
    again at step 4."""
    import logging

    shutil.rmtree(ws / "artifacts/adapter")
    (ws / "metrics/train.json").unlink()
    with caplog.at_level(logging.INFO, logger="finetune.train"):
        stage("train", params_of(ws), ws)
    assert "saved as early stopping ended its run" in caplog.text
    assert "resuming from" in caplog.text and "checkpoint-2" in caplog.text
    assert outputs(ws) == plateau
    assert not (ws / "artifacts/checkpoints").exists()


def test_the_new_params_are_in_the_checkpoints_fingerprint(ws):
    """Checkpoints of a run with another eval_steps or patience are not resumed from."""
    from tasks.train import _fingerprint
    from tasks.workspace import Workspace

    params = params_of(ws)
    prints = {_fingerprint(params.model_copy(update={"train": params.train.model_copy(update=change)}),
                           Workspace(ws))
              for change in ({}, {"eval_steps": 2}, {"early_stopping_patience": PATIENCE + 1},
                             {"early_stopping_threshold": 0.5}, {"metric_for_best_model": "loss"})}
    assert len(prints) == 5


def test_log_table_leaves_eval_loss_empty_where_not_computed():
    from tasks.train import _log_table

    history = [{"step": s, "loss": 2.0, "learning_rate": 0.1, "tokens_seen": 10 * s} for s in (2, 4, 6)]
    table = _log_table(history, [{"step": 3, "eval_loss": 1.5}, {"step": 6, "eval_loss": 1.25}])
    assert table.splitlines() == ["step\tloss\tlearning_rate\ttokens_seen\teval_loss",
                                  "2\t2.0\t0.1\t20\t", "3\t\t\t\t1.5", "4\t2.0\t0.1\t40\t",
                                  "6\t2.0\t0.1\t60\t1.25"]
