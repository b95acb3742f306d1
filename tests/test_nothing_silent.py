"""Nothing silent, nothing lost: no stage deletes what it did not write, training refuses
sizes the host cannot hold, and the flow's temporary Prefect server failing to start is one
message. Through the real CLI (conftest.finetune, in this process) on a small workspace of
the tiny model and the sample data, without git or DVC."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, SAMPLE, TINY_PARAMS, env, finetune, merge, shipped_params


@pytest.fixture
def ws(tmp_path, tiny_model) -> Path:
    """The tiny model, the sample data and TINY_PARAMS: enough for prepare, tokenize, train."""
    root = tmp_path / "ws"
    shutil.copytree(tiny_model, root / "models/tiny")
    (root / "data/raw").mkdir(parents=True)
    shutil.copy(SAMPLE, root / "data/raw" / SAMPLE.name)
    set_params(root)
    return root


def set_params(root: Path, over: dict | None = None) -> None:
    params = merge(merge(shipped_params(), TINY_PARAMS), over or {})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def error_line(proc: subprocess.CompletedProcess[str], command: str) -> str:
    """The message's line; asserts exit 2, no traceback, and that it is the only error line."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = [line for line in proc.stderr.splitlines() if line.startswith(f"{command}: error: ")]
    return line


# --- outputs: replace only what the pipeline wrote ----------------------------------------------

def test_a_folder_where_an_output_file_goes_is_refused_and_kept(ws):
    """The issue's trial: `mkdir metrics/prepare.json; touch metrics/prepare.json/notes.txt;
    finetune prepare` removed the folder and the user's file without a word."""
    (ws / "metrics/prepare.json").mkdir(parents=True)
    (ws / "metrics/prepare.json/notes.txt").write_text("mine\n")
    assert error_line(finetune(ws, "prepare"), "finetune prepare") == (
        "finetune prepare: error: metrics/prepare.json is a folder holding files the pipeline did "
        "not write (it writes a file there): move them away")
    assert (ws / "metrics/prepare.json/notes.txt").read_text() == "mine\n"
    assert not list((ws / "metrics").glob(".prepare.json.tmp-*"))
    # An empty folder holds nothing to lose: it is replaced.
    shutil.rmtree(ws / "metrics/prepare.json")
    (ws / "metrics/prepare.json").mkdir()
    assert finetune(ws, "prepare").returncode == 0
    assert (ws / "metrics/prepare.json").is_file()


def test_a_link_where_an_output_goes_is_refused_and_kept(ws, tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text("{}\n")
    (ws / "metrics").mkdir()
    (ws / "metrics/prepare.json").symlink_to(outside)
    line = error_line(finetune(ws, "prepare"), "finetune prepare")
    assert line == (f"finetune prepare: error: metrics/prepare.json is a symlink to {outside}, and the "
                    "stage would replace the link with its output, not write through it: remove the "
                    "link (to keep outputs on another disk, link metrics instead)")
    assert (ws / "metrics/prepare.json").is_symlink() and outside.read_text() == "{}\n"


def test_an_output_folder_of_an_earlier_run_is_replaced(ws):
    assert finetune(ws, "prepare").returncode == 0
    (ws / "data/prepared/stale.jsonl").write_text("")
    assert finetune(ws, "prepare").returncode == 0
    assert sorted(p.name for p in (ws / "data/prepared").iterdir()) == [
        "test.jsonl", "train.jsonl", "validation.jsonl"]


# --- train's checkpoints folder ----------------------------------------------------------------

CHECKPOINTS = Path("artifacts/checkpoints")


@pytest.mark.parametrize("setup, expected", [
    ("dangling", "finetune train: error: artifacts/checkpoints is a symlink to {missing}, which does "
                 "not exist: create that folder (train keeps its checkpoints there), or remove the link"),
    ("file", "finetune train: error: artifacts/checkpoints is a file, where train keeps its "
             "checkpoints: move it away"),
])
def test_train_refuses_a_checkpoints_folder_it_cannot_clear_before_training(ws, tmp_path, setup, expected):
    folder = ws / CHECKPOINTS
    folder.parent.mkdir(parents=True)
    missing = tmp_path / "missing"
    if setup == "dangling":
        folder.symlink_to(missing)
    else:
        folder.write_text("mine\n")
    # No data/tokenized: the refusal comes before anything is loaded.
    assert error_line(finetune(ws, "train"), "finetune train") == expected.format(missing=missing)
    kept = {"dangling": folder.is_symlink,
            "file": lambda: folder.read_text() == "mine\n"}
    assert kept[setup]()


@pytest.fixture
def mounted(tmp_path):
    """mount(folder): a small tmpfs over `folder` (root only), unmounted at teardown."""
    folders: list[Path] = []

    def mount(folder: Path) -> None:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        folder.mkdir(parents=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        folders.append(folder)

    yield mount
    for folder in folders:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("kind", ["symlink", "mount point", "folder"])
def test_checkpoints_on_a_link_or_mount_point_are_cleared_not_the_folder(ws, tmp_path, kind, mounted):
    """A link or a mount point (a bigger disk for the checkpoints) with stale checkpoints of
    another run: discarding them and the final clean-up ended in an rmtree traceback; now
    train removes its checkpoints in it and keeps the link or mount point, and what it did not
    write there (a tracker's logs, a user's notes) with the folder."""
    folder = ws / CHECKPOINTS
    if kind == "symlink":
        target = tmp_path / "big-disk"
        target.mkdir()
        folder.parent.mkdir(parents=True)
        folder.symlink_to(target)
    elif kind == "mount point":
        mounted(folder)
    else:
        folder.mkdir(parents=True)
        (folder / "notes.txt").write_text("mine\n")
    (folder / "checkpoint-1").mkdir()
    (folder / "checkpoint-1/trainer_state.json").write_text("{}")
    (folder / "fingerprint.txt").write_text("another run")
    if kind == "mount point":
        (folder / "lost+found").mkdir()  # what a fresh ext4 filesystem holds
    for stage in ("prepare", "tokenize", "train"):
        proc = finetune(ws, stage)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "discarding checkpoints of a run with other params or data" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (ws / "artifacts/adapter/adapter_config.json").is_file()
    assert {"symlink": folder.is_symlink, "mount point": lambda: os.path.ismount(folder),
            "folder": folder.is_dir}[kind]()
    assert [p.name for p in folder.iterdir()] == {"symlink": [], "mount point": ["lost+found"],
                                                  "folder": ["notes.txt"]}[kind]



# --- training memory on a CPU --------------------------------------------------------------------

def test_train_refuses_a_batch_past_the_host_memory(ws):
    """The issue's trial: a batch of 1e9 (which `finetune check` now refuses too) trained on,
    logging a 3.6M GiB estimate. Refused before any data is read (there is none here)."""
    set_params(ws, {"train": {"per_device_train_batch_size": 10**9}})
    line = error_line(finetune(ws, "train"), "finetune train")
    assert line.startswith("finetune train: error: training needs about "), line
    has = "GiB of memory (MemTotal)" if Path("/proc/meminfo").exists() else "GiB free"
    assert has in line and line.endswith(
        "lower train.per_device_train_batch_size (raise gradient_accumulation_steps to keep the "
        "effective batch) or tokenize.max_length, keep train.gradient_checkpointing: true, or "
        "use quant.load_in_4bit: true"), line


# --- the flow's temporary Prefect server ---------------------------------------------------------

def test_flow_names_the_setting_when_the_temporary_server_does_not_start(tmp_path):
    """A fresh PREFECT_HOME on a loaded machine: the temporary server answered after
    Prefect's start-up timeout, and `python -m flows.finetune` ended in a RuntimeError
    traceback. A timeout of 0 seconds makes every start too slow."""
    fresh = {k: v for k, v in env().items() if not k.startswith("PREFECT_")}  # no PREFECT_API_URL
    fresh.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(REPO),
                 PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0")
    proc = subprocess.run([sys.executable, "-m", "flows.finetune"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=fresh)
    assert error_line(proc, "python -m flows.finetune") == (
        "python -m flows.finetune: error: Prefect's temporary API server did not answer within 0 s "
        "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS): set "
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120 (a loaded machine, or a fresh "
        "PREFECT_HOME, takes longer), or start a server with `prefect server start` and set "
        "PREFECT_API_URL=http://127.0.0.1:4200/api")


def test_other_runtime_errors_keep_their_traceback():
    from flows.finetune import server_start_failure

    assert server_start_failure(RuntimeError("stage 'train' failed")) is None
    assert "exited with code 3 before it answered" in server_start_failure(RuntimeError(
        "Timed out while attempting to connect to ephemeral Prefect API server. Ephemeral server "
        "process exited with code 3."))
