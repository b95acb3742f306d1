"""train: SIGKILL mid-run, rerun, and the adapter is byte-identical to an uninterrupted run;
a diverging run stops with a message naming the step."""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tasks import prepare, tokenize
from tasks.config import parse_params

from .conftest import SAMPLE, TINY_PARAMS, env, merge, shipped_params

STEPS = 8
KILL_AFTER = "checkpoint-4"


def adapter_digest(ws: Path) -> str:
    return hashlib.sha256((ws / "artifacts/adapter/adapter_model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model):
    import os

    ws = tmp_path_factory.mktemp("resume")
    shutil.copytree(tiny_model, ws / "models/tiny")
    (ws / "data/raw").mkdir(parents=True)
    shutil.copy(SAMPLE, ws / "data/raw/dialogues.jsonl")
    raw = merge(shipped_params(), merge(TINY_PARAMS, {"train": {"max_steps": STEPS, "save_steps": 2}}))
    (ws / "params.yaml").write_text(yaml.safe_dump(raw))
    cwd = os.getcwd()
    os.chdir(ws)
    try:
        params = parse_params(raw, "params.yaml")
        prepare.run(params)
        tokenize.run(params)
    finally:
        os.chdir(cwd)
    return ws


def train(ws: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["finetune", "train", *extra], cwd=ws, env=env(), capture_output=True,
                          text=True, timeout=600)


def test_killed_training_resumes_to_the_same_adapter(ws):
    done = train(ws)
    assert done.returncode == 0, done.stderr
    uninterrupted = adapter_digest(ws)
    shutil.rmtree(ws / "artifacts/adapter")

    proc = subprocess.Popen(["finetune", "train"], cwd=ws, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint = ws / "artifacts/checkpoints" / KILL_AFTER / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not checkpoint.is_file():
        assert proc.poll() is None, "training ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (ws / "artifacts/adapter").exists()  # nothing half-written

    resumed = train(ws)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    assert adapter_digest(ws) == uninterrupted
    assert not (ws / "artifacts/checkpoints").exists()


def test_diverging_loss_stops_with_the_step(ws):
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["train"]["learning_rate"] = 1.0e30  # overflows float32 within a step or two
    (ws / "diverge.yaml").write_text(yaml.safe_dump(params))
    out = train(ws, "--params", "diverge.yaml")
    assert out.returncode == 2
    assert "error: training loss is" in out.stderr and "at step" in out.stderr
    assert "Traceback" not in out.stderr


def test_length_grouped_batches_train_to_a_similar_loss(ws):
    """A throughput feature must not change what is learned beyond noise."""
    import json

    baseline = json.loads((ws / "metrics/train.json").read_text())["train_loss"]
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["train"]["train_sampling_strategy"] = "group_by_length"
    (ws / "grouped.yaml").write_text(yaml.safe_dump(params))
    out = train(ws, "--params", "grouped.yaml")
    assert out.returncode == 0, out.stderr
    grouped = json.loads((ws / "metrics/train.json").read_text())["train_loss"]
    assert abs(grouped - baseline) / baseline < 0.05  # same data, same steps: within 5%


def test_tf32_and_liger_need_their_hardware(ws):
    from tasks.errors import PipelineError
    from tasks.train import training_arguments

    raw = yaml.safe_load((ws / "params.yaml").read_text())
    for key, needle in (("tf32", "no GPU with TF32"), ("use_liger_kernel", "liger-kernel package")):
        bad = parse_params(merge(raw, {"train": {key: True}}), "p")
        with pytest.raises(PipelineError, match=needle):
            training_arguments(bad, str(ws / "unused"))
