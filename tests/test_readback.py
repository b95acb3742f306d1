"""Files the pipeline writes and reads back later (registry entries and latest.json, evaluate's
predictions and lm-eval scores, the adapter, the tokenized dataset, a checkpoint's trainer
state, the export manifest), each damaged in turn: cut to half, overwritten with garbage
bytes, given another JSON shape, emptied of its keys or deleted. The command that reads it,
run through the real CLI, stops with exit 2 and one line that starts with the file (and says
how to get a good one), never a traceback.

The cases share one copy of the session's trained workspace; each restores what it damaged."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from .conftest import copy_workspace, finetune

CUT, GARBAGE, LIST, NO_KEYS, MISSING = "cut", "garbage", "list", "no-keys", "missing"
JSON_DAMAGE = (CUT, GARBAGE, LIST)
ENTRY = "registry/ENTRY"  # the promoted model's folder, whatever its hash
CHECKPOINT = "artifacts/checkpoints/checkpoint-2"
LM_EVAL_PARAMS = "params-lm-eval.yaml"  # evaluate.lm_eval_tasks set: promote reads metrics/lm_eval.json
ALIGN_PARAMS = "params-align.yaml"  # align.enabled: align reads the SFT adapter
ADAPTER_PREDICT = ("predict", "--input", "data/raw/dialogues.jsonl", "--model", "artifacts/adapter",
                   "--output", "out.jsonl")

# (file, how it is damaged, the command that reads it, what the message starts with when it
# is not the file itself)
CASES: list[tuple[str, tuple[str, ...], tuple[str, ...], str | None]] = [
    ("registry/latest.json", (*JSON_DAMAGE, NO_KEYS), ("promote",), None),
    (f"{ENTRY}/scored.json", (*JSON_DAMAGE, NO_KEYS), ("promote",), None),
    (f"{ENTRY}/predictions.jsonl", (*JSON_DAMAGE, NO_KEYS, MISSING), ("promote",), None),
    ("reports/predictions.jsonl", (*JSON_DAMAGE, NO_KEYS, MISSING), ("promote",), None),
    ("metrics/lm_eval.json", (*JSON_DAMAGE, NO_KEYS, MISSING), ("promote", "--params", LM_EVAL_PARAMS), None),
    ("artifacts/merged/manifest.json", (*JSON_DAMAGE, NO_KEYS), ("push", "--repo-id", "org/model"), None),
    ("artifacts/adapter/adapter_config.json", (*JSON_DAMAGE, NO_KEYS, MISSING), ("evaluate",), None),
    ("artifacts/adapter/tokenizer.json", JSON_DAMAGE, ("export",), None),
    ("artifacts/adapter/adapter_config.json", (GARBAGE,), ADAPTER_PREDICT, None),
    ("artifacts/adapter/adapter_config.json", (GARBAGE,), ("align", "--params", ALIGN_PARAMS), None),
    ("registry/latest.json", (GARBAGE,), (*ADAPTER_PREDICT[:4], "registry/latest", *ADAPTER_PREDICT[5:]), None),
    ("data/prepared/test.jsonl", (*JSON_DAMAGE, NO_KEYS, MISSING), ("evaluate",), None),
    ("data/tokenized/dataset_dict.json", (*JSON_DAMAGE, NO_KEYS, MISSING), ("train",), None),
    ("data/tokenized/train/state.json", (*JSON_DAMAGE, NO_KEYS, MISSING), ("train",), None),
    ("data/tokenized/train/dataset_info.json", (*JSON_DAMAGE, MISSING), ("train",), None),
    ("data/tokenized/tokenizer/tokenizer_config.json", JSON_DAMAGE, ("train",), None),
    ("data/tokenized/train/data-00000-of-00001.arrow", (CUT, GARBAGE, MISSING), ("train",), "data/tokenized"),
    (f"{CHECKPOINT}/trainer_state.json", (*JSON_DAMAGE, NO_KEYS), ("train",), None),
]


def cut(data: bytes) -> bytes:
    """The first half, ending inside a value rather than after a whole JSON line."""
    end = len(data) // 2
    while data[end - 1:end] in (b"\n", b"}"):
        end -= 1
    return data[:end]


def damaged(data: bytes, how: str, jsonl: bool) -> bytes | None:
    """`data` damaged `how`; None for deleted."""
    return {CUT: cut(data), GARBAGE: b"\xff\x00garbage", LIST: b"[]\n",
            NO_KEYS: b"{}\n" if jsonl else b"{\"unrelated\": 1}\n", MISSING: None}[how]


@contextlib.contextmanager
def damaging(path: Path, how: str) -> Iterator[None]:
    kept = path.read_bytes()
    try:
        bad = damaged(kept, how, path.suffix == ".jsonl")
        if bad is None:
            path.unlink()
        else:
            path.write_bytes(bad)
        yield
    finally:
        path.write_bytes(kept)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, trained_workspace) -> Path:
    """The trained workspace with a promoted model in its registry, a params file listing an
    lm-eval task, and the checkpoint of an interrupted train that a rerun resumes from."""
    from tasks.config import load_params
    from tasks.train import _resume_checkpoint
    from tasks.workspace import Workspace

    root = copy_workspace(trained_workspace, tmp_path_factory.mktemp("readback") / "ws")
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["promote"]["min_gain"] = -1.0  # the tuned model beats the base: a registry entry to damage
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for name, section, change in ((LM_EVAL_PARAMS, "evaluate", {"lm_eval_tasks": ["data/lm_eval/smoke_mc.yaml"]}),
                                  (ALIGN_PARAMS, "align", {"enabled": True})):
        (root / name).write_text(yaml.safe_dump({**raw, section: raw[section] | change}, sort_keys=False))
    promoted = finetune(root, "promote")
    assert promoted.returncode == 0, promoted.stderr
    # What an interrupted train leaves: the fingerprint of these params and data, a checkpoint.
    _resume_checkpoint(load_params(root / "params.yaml"), Workspace(root))
    (root / CHECKPOINT).mkdir()
    (root / CHECKPOINT / "trainer_state.json").write_text(
        '{"global_step": 2, "log_history": [{"step": 1, "loss": 5.8, "learning_rate": 0.0002}]}\n')
    return root


@pytest.mark.parametrize(("relative", "how", "command", "named"), [
    pytest.param(relative, how, command, named, id=f"{command[0]}-{relative.replace('/', '_')}-{how}")
    for relative, hows, command, named in CASES for how in hows])
def test_a_damaged_file_ends_in_one_message_naming_it(ws, relative, how, command, named):
    entry = next(p for p in (ws / "registry").iterdir() if p.is_dir()).relative_to(ws).as_posix()
    relative = relative.replace(ENTRY, entry)
    with damaging(ws / relative, how):
        result = finetune(ws, *command)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    prefix = f"finetune {command[0]}: error: "
    assert [line for line in lines if line.startswith(prefix)] == lines[-1:], result.stderr[-3000:]
    assert lines[-1].removeprefix(prefix).startswith(named or relative), lines[-1]
    assert any(fix in lines[-1] for fix in ("`dvc repro", "restore", "delete")), lines[-1]

