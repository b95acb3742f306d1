"""Damaged model files, data from outside data/raw/, and special files DVC hangs on, run as a
user would (conftest.finetune: the CLI's main in this process). Each refusal is exit 2 with one
message naming the file and no traceback, before any weights load: the workspace here holds
only params.yaml, dvc.yaml, the sample data and the tiny model, so nothing trains."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, SAMPLE, TINY_PARAMS, merge, shipped_params
from .conftest import finetune as finetune_in_process

MODEL = "models/tiny"
AGAIN = "copy or download the model again"
SIZE = r"\d+(\.\d)? (bytes|kB|MB|GB)"


@pytest.fixture
def ws(tmp_path, tiny_model) -> Path:
    root = tmp_path / "ws"
    shutil.copytree(tiny_model, root / MODEL)
    (root / "data/raw").mkdir(parents=True)
    shutil.copy(SAMPLE, root / "data/raw" / SAMPLE.name)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(merge(shipped_params(), TINY_PARAMS), sort_keys=False))
    return root


def error_line(ws: Path, *args: str) -> str:
    """The first stderr line of `finetune ARGS`; asserts exit 2 and no traceback."""
    proc = finetune_in_process(ws, *args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.splitlines()[0]


def _header(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    return length, json.loads(data[8:8 + length])


def truncate_weights(folder: Path) -> str:
    path = folder / "model.safetensors"
    length, header = _header(path)
    tensors = max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
    with path.open("r+b") as f:
        f.truncate(8 + length + tensors // 2)
    return rf"damaged or cut short \(header says {SIZE} of tensors, file holds {SIZE}\): {AGAIN}"


def garble_header(folder: Path) -> str:
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe{["
    path.write_bytes(bytes(data))
    return rf"damaged or cut short \(its header is not the JSON table of tensors safetensors writes\): {AGAIN}"


def huge_header_length(folder: Path) -> str:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    return rf"damaged or cut short \(header length 1099.5 GB, file holds {SIZE}\): {AGAIN}"


def cut_json(name: str):
    def damage(folder: Path) -> str:
        path = folder / name
        text = path.read_bytes()
        path.write_bytes(text[:len(text) // 2])
        return rf"not valid JSON \(cut short\) \(.*\); {AGAIN}"
    damage.__name__ = f"cut_{name}"
    return damage


def json_list(name: str):
    def damage(folder: Path) -> str:
        (folder / name).write_text("[]")
        return rf"holds a list where an object was expected; {AGAIN}"
    damage.__name__ = f"list_in_{name}"
    return damage


DAMAGE = {
    "model.safetensors": [truncate_weights, garble_header, huge_header_length],
    "tokenizer.json": [cut_json("tokenizer.json")],
    "config.json": [cut_json("config.json"), json_list("config.json")],
    "tokenizer_config.json": [cut_json("tokenizer_config.json")],
    "generation_config.json": [cut_json("generation_config.json")],
}
CASES = [pytest.param(name, damage, id=damage.__name__) for name, ds in DAMAGE.items() for damage in ds]


@pytest.mark.parametrize(("name", "damage"), CASES)
@pytest.mark.parametrize("command", ["check", "train"])
def test_damaged_model_file_is_refused_naming_it(ws, name, damage, command):
    """`finetune check` and train's first load (the model's config, before the memory
    preflight and the weights) refuse it: not SafetensorError's 'incomplete metadata'."""
    message = damage(ws / MODEL)
    line = error_line(ws, command)
    assert re.match(rf"finetune {command}: error: {MODEL}/{name}: {message}$", line), line


def test_missing_shard_is_refused(ws):
    folder = ws / MODEL
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert error_line(ws, "check") == (
        f"finetune check: error: {MODEL}/model-00002-of-00002.safetensors: missing, but "
        f"{MODEL}/model.safetensors.index.json lists it: {AGAIN}")


def test_whole_model_passes_and_is_checked_once(ws, monkeypatch):
    from tasks import modeling

    proc = finetune_in_process(ws, "check")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    reads = []
    monkeypatch.setattr(modeling, "_check_safetensors", reads.append)
    modeling.check_model_files(ws / MODEL)
    assert reads == []  # unchanged since check read it
    (ws / MODEL / "model.safetensors").touch()
    os.utime(ws / MODEL / "model.safetensors", ns=(1, 1))
    modeling.check_model_files(ws / MODEL)
    assert reads == [ws / MODEL / "model.safetensors"]


def set_data(ws: Path, **data) -> None:
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["data"].update(data)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


OUTSIDE = ("local data must be under data/raw/, and '{path}' is a local {kind} outside it: copy the "
           "data into data/raw/ (the folder DVC tracks) and name it there")


@pytest.mark.parametrize("command", ["check", "prepare"])
def test_data_outside_data_raw_is_refused(ws, tmp_path, command):
    """A folder holding a JSONL with a revision was read through `datasets`; /etc/passwd was
    taken for a Hub id needing a revision."""
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(SAMPLE, outside / "part.jsonl")
    (ws / "elsewhere").symlink_to(outside)
    for path, kind in [(str(outside), "folder"), ("/etc/passwd", "file"), ("elsewhere", "symlink"),
                       ("data/raw/../../x.jsonl", "path")]:
        set_data(ws, path=path, revision="main")
        proc = finetune_in_process(ws, command)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.splitlines()[:2] == [f"finetune {command}: error: params.yaml: 1 problem(s):",
                                                f"  - data: path: {OUTSIDE.format(path=path, kind=kind)}"]
    assert not (ws / "data/prepared").exists()


def test_folder_under_data_raw_is_refused_for_what_it_is(ws):
    (ws / "data/raw/parts").mkdir()
    set_data(ws, path="data/raw/parts")
    proc = finetune_in_process(ws, "check")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[1] == (
        "  - data: path: 'data/raw/parts' is a folder: name its files, e.g. 'data/raw/parts/*.jsonl'")


def test_fifo_under_data_raw_is_warned_by_check_and_refused_by_prepare(ws):
    """DVC blocks for ever hashing a FIFO: check warns (it cannot stop dvc); prepare never
    opens one, which would block it too."""
    os.mkfifo(ws / "data/raw/pipe.jsonl")
    os.mkfifo(ws / MODEL / "stream")
    proc = finetune_in_process(ws, "check")
    assert proc.returncode == 0, proc.stderr
    tail = ("DVC cannot version it, and on a FIFO dvc status and dvc repro hang (Ctrl-C stops them): "
            "remove it or move it out of data/ and models/")
    assert proc.stderr.splitlines() == [
        f"finetune check: warning: data/raw/pipe.jsonl is a FIFO (named pipe): {tail}",
        f"finetune check: warning: {MODEL}/stream is a FIFO (named pipe): {tail}"]
    set_data(ws, path="data/raw/*.jsonl")
    assert error_line(ws, "prepare") == (
        "finetune prepare: error: data.path: data/raw/pipe.jsonl is a FIFO (named pipe), not a data "
        "file: put the data in a regular file under data/raw/")


def test_align_path_and_predict_input_are_held_to_the_same_rules(ws):
    """align.path is read like data.path (only from data/raw/); predict's --input is never
    opened when it is a FIFO, which would block it."""
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["align"]["path"] = "/etc/passwd"
    (ws / "align.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = finetune_in_process(ws, "check", "--params", "align.yaml")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[1] == f"  - align: path: {OUTSIDE.format(path='/etc/passwd', kind='file')}"
    os.mkfifo(ws / "data/raw/pipe.jsonl")
    assert error_line(ws, "predict", "--input", "data/raw/pipe.jsonl", "--model", str(MODEL),
                      "--output", "out.jsonl") == (
        "finetune predict: error: --input: data/raw/pipe.jsonl is a FIFO (named pipe), not a data file: "
        "name a regular file")
