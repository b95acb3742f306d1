"""Adversarial trials, run as a user would: the `finetune` CLI's main (conftest.finetune: in
this process, with a shell's working directory, environment and output streams), in a copy of
the session's trained workspace (every stage run once). Each case asserts the exit code, the
exact first line of the message, and that the workspace (outputs, metrics, dvc.lock, and no
leftover temporary output) is as it was before the command. Real processes only where the
process is the point: the console script's exit code once end to end, a run as another user
(permissions), and kill -9.

Full disks and read-only filesystems are real tmpfs mounts over a workspace folder (root
only: the tests skip elsewhere). Cases tested elsewhere and not repeated here:
unsafe (dunder) templates in tests/test_templates.py::test_unsafe_or_malformed_templates_are_refused
and tests/test_config.py::test_custom_template_rules, a pickle-only model in
tests/test_reliability.py::test_pickle_weights_are_refused_unless_allowed, kill -9 during
train in tests/test_train_resume.py::test_killed_training_resumes_to_the_same_adapter.
"""

from __future__ import annotations

import codecs
import csv
import gc
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tasks.errors import PipelineError
from tasks.io import atomic_path
from tasks.workspace import Workspace

from .conftest import copy_workspace, env, run
from .conftest import finetune as finetune_in_process

WS = Workspace()  # the file contract, relative to a workspace's root

STAGE_TIMEOUT_S = 600
KILL_WAIT_S = 300
# Free space left on a full tmpfs: below what any stage writes, above a page or two.
SLACK = 8 << 10
NOBODY = 65534  # the unprivileged user a root test runner drops to for permission errors


@pytest.fixture
def ws(trained_workspace, tmp_path) -> Path:
    """A copy of the session's workspace after every stage (prepare..promote): the cases
    below refuse before writing, rewrite what is there, or remove what must be absent."""
    return copy_workspace(trained_workspace, tmp_path / "ws")


def finetune(ws: Path, *args: str, user: int | None = None,
             process: bool = False) -> subprocess.CompletedProcess[str]:
    """`finetune ARGS` in `ws`: in this process, or (`process`, or as `user` through setpriv:
    permissions belong to a process) the console script in a real one."""
    if user is None and not process:
        return finetune_in_process(ws, *args)
    prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user else []
    return subprocess.run([*prefix, "finetune", *args], cwd=ws, env=env(), capture_output=True,
                          text=True, timeout=STAGE_TIMEOUT_S)


def error_line(proc: subprocess.CompletedProcess[str], stage: str) -> str:
    """The first line of the error message; asserts exit 2 and no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return next((line for line in proc.stderr.splitlines() if line.startswith(f"finetune {stage}: error: ")),
                proc.stderr[-3000:])


def refused(ws: Path, stage: str, user: int | None = None, process: bool = False) -> str:
    """Runs `finetune stage`; asserts exit 2 and an unchanged workspace; returns the message's
    first line."""
    before = snapshot(ws)
    line = error_line(finetune(ws, stage, user=user, process=process), stage)
    assert snapshot(ws) == before
    return line


# Version control's own state, not the workspace's: git, and DVC's scratch (opening the repo
# writes .dvc/tmp/btime).
NOT_WORKSPACE = (".git", ".dvc/tmp")


def snapshot(root: Path) -> dict[str, str]:
    """Every file, folder and link under `root` (but NOT_WORKSPACE): its content hash,
    "folder" or its target."""
    out = {}
    for parent, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if str(Path(parent, d).relative_to(root)) not in NOT_WORKSPACE]
        for name in dirs + files:
            path = Path(parent) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = f"-> {os.readlink(path)}"
            elif path.is_dir():
                out[rel] = "folder"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def set_params(ws: Path, **sections: dict) -> None:
    params = yaml.safe_load((ws / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def tmpfs(tmp_path) -> Iterator:
    """mount(folder, slack=SLACK, read_only=False): a tmpfs over `folder` holding a copy of
    its files, with `slack` bytes free (or read-only). Unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []

    def mount(folder: Path, slack: int = SLACK, read_only: bool = False) -> None:
        backup = tmp_path / f"backup-{len(mounted)}"
        shutil.copytree(folder, backup, symlinks=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(folder)
        shutil.copytree(backup, folder, symlinks=True, dirs_exist_ok=True)
        used = shutil.disk_usage(folder).used
        assert used + slack > 0, "size=0 would mean a tmpfs without limit"
        options = "remount,ro" if read_only else f"remount,size={used + slack}"
        subprocess.run(["mount", "-o", options, str(folder)], check=True)

    yield mount
    # A failed torch.save keeps its file open until its traceback is collected.
    gc.collect()
    for folder in reversed(mounted):
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(folder)], check=True)


# --- params.yaml ----------------------------------------------------------------------------

def test_empty_params_file(ws):
    """Also the one end-to-end run of the console script here that a refusal is exit 2, one
    message and no traceback from a real process (it fails before importing torch: cheap)."""
    (ws / "params.yaml").write_text("")
    assert refused(ws, "prepare", process=True) == "finetune prepare: error: params.yaml: 1 problem(s):"
    assert refused(ws, "prepare") == "finetune prepare: error: params.yaml: 1 problem(s):"
    proc = finetune(ws, "prepare")
    assert proc.stderr.splitlines()[1] == "  - the file must be a mapping of sections (data, prompt, model, ...)"


def test_yaml_alias_bomb_is_reported_shortly(ws):
    """Nine levels of nine aliases: 9**9 strings if expanded. The error shows the value cut."""
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, cur in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{cur}: &{cur} [{', '.join([f'*{prev}'] * 9)}]")
    (ws / "params.yaml").write_text("\n".join([*lines, "data: *i"]) + "\n")
    assert refused(ws, "prepare") == "finetune prepare: error: params.yaml: 10 problem(s):"
    assert len(finetune(ws, "prepare").stderr) < 4000  # it was 2 GB of repr


# --- full disks, read-only and forbidden folders ---------------------------------------------

NO_SPACE = "no space left on device; nothing was moved into place (free space there, or write the outputs elsewhere)"


def test_full_disk_at_prepare(ws, tmpfs):
    tmpfs(ws / "data")
    assert refused(ws, "prepare") == f"finetune prepare: error: data/prepared: {NO_SPACE}"


def test_full_disk_at_tokenize(ws, tmpfs):
    tmpfs(ws / "data")
    assert refused(ws, "tokenize") == f"finetune tokenize: error: data/tokenized: {NO_SPACE}"


def test_full_disk_at_evaluate(ws, tmpfs):
    tmpfs(ws / "reports", slack=0)
    assert refused(ws, "evaluate") == f"finetune evaluate: error: reports/predictions.jsonl: {NO_SPACE}"


SIZE = r"\d+(\.\d)? [KMG]iB"


PREFLIGHT_REFUSALS = {
    "train": rf"finetune train: error: train: artifacts/checkpoints needs about {SIZE} of disk \(3 "
             rf"checkpoints of {SIZE} at the peak, and the adapter\) but its filesystem has {SIZE} "
             r"free: free space there, or lower train.save_total_limit \(now 2\)",
    "export": rf"finetune export: error: export: artifacts/merged needs about {SIZE} of disk \(the "
              rf"merged model in float32\) but its filesystem has {SIZE} free: free space there, or "
              r"set export.torch_dtype: bfloat16 \(half of float32\)",
}


@pytest.mark.parametrize("stage", PREFLIGHT_REFUSALS)
def test_stage_refuses_when_its_outputs_would_not_fit(ws, tmpfs, stage):
    """The issue's trial (a small filesystem under artifacts/) ended export in a SafetensorError
    traceback after all the work; now train and export refuse before loading any weights."""
    tmpfs(ws / "artifacts")
    assert re.fullmatch(PREFLIGHT_REFUSALS[stage], refused(ws, stage))


# Above train's preflight estimate for the tiny model (170 KiB: weights and optimizer state),
# below what its checkpoints take with their tokenizer and state files (about 310 KiB).
PAST_PREFLIGHT = 200 << 10


def test_full_disk_while_train_writes_checkpoints(ws, tmpfs):
    """The preflight passes, the disk fills up anyway: the checkpoint folder is named, and the
    outputs are as they were (a partial checkpoint is dropped when train resumes)."""
    tmpfs(ws / "artifacts", slack=PAST_PREFLIGHT)
    before = snapshot(ws)
    line = error_line(finetune(ws, "train"), "train")
    assert line == f"finetune train: error: artifacts/checkpoints: {NO_SPACE}"
    # reports/progress.json is train's live status (not a DVC output): it shows this failed run.
    after = {k: v for k, v in snapshot(ws).items()
             if not k.startswith("artifacts/checkpoints") and k != str(WS.progress)}
    before.pop(str(WS.progress), None)
    assert after == before


def test_read_only_filesystem(ws, tmpfs):
    tmpfs(ws / "data", read_only=True)
    assert refused(ws, "prepare") == (
        "finetune prepare: error: data/prepared: read-only file system; nothing was moved into "
        "place (remount it read-write, or run from a writable checkout)")


def test_permission_denied(ws):
    """A folder the user may not write. Root ignores file modes, so a root runner runs the
    stage as `nobody` on a copy that user owns."""
    user = NOBODY if os.geteuid() == 0 else None
    if user is not None:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop to an unprivileged user")
        # pytest's temporary folders are private to root: use one every user can enter.
        shared = Path(tempfile.mkdtemp(prefix="adversarial-"))
        shared.chmod(0o755)
        ws = Path(shutil.copytree(ws, shared / "ws", symlinks=True))
        for parent, dirs, files in os.walk(ws):
            for name in [parent, *(os.path.join(parent, n) for n in dirs + files)]:
                os.lchown(name, user, user)
    try:
        (ws / "data").chmod(0o555)
        assert refused(ws, "prepare", user=user) == (
            "finetune prepare: error: data/prepared: permission denied; nothing was moved into "
            "place (make it writable (and readable) by this user)")
    finally:
        (ws / "data").chmod(0o755)
        if user is not None:
            shutil.rmtree(ws.parent)


def test_safetensors_on_a_full_disk_names_the_output(tmp_path, tmpfs):
    """What export meets if the disk fills up after its preflight (another process writing):
    safetensors raises its own error type; nothing is left behind."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "artifacts"
    folder.mkdir()
    tmpfs(folder)
    final = folder / "merged"
    with pytest.raises(PipelineError) as info, atomic_path(final) as tmp:
        tmp.mkdir()
        save_file({"w": torch.zeros(SLACK)}, tmp / "model.safetensors")
    assert str(info.value) == f"{final}: {NO_SPACE}"
    assert list(folder.iterdir()) == []


def test_torch_save_on_a_full_disk_names_the_output(tmp_path, tmpfs):
    """torch.save (a Trainer checkpoint's optimizer state) reports a full disk without errno."""
    import torch

    folder = tmp_path / "artifacts"
    folder.mkdir()
    tmpfs(folder)
    final = folder / "optimizer.pt"
    with pytest.raises(PipelineError) as info, atomic_path(final) as tmp:
        torch.save({"w": torch.zeros(SLACK)}, tmp)
    assert str(info.value) == f"{final}: {NO_SPACE}"
    assert list(folder.iterdir()) == []


# --- models ---------------------------------------------------------------------------------

def test_remote_code_is_refused_and_never_imported(ws):
    model = ws / "models/custom"
    shutil.copytree(ws / "models/tiny", model)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_custom.CustomConfig",
                          "AutoModelForCausalLM": "modeling_custom.CustomModel"}
    (model / "config.json").write_text(json.dumps(config))
    marker = ws / "imported.txt"
    (model / "modeling_custom.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('custom code ran')\n")
    set_params(ws, model={"name_or_path": "models/custom"})
    for stage in ("tokenize", "train"):
        assert refused(ws, stage) == (
            f"finetune {stage}: error: model.trust_remote_code is false but models/custom/config.json "
            "(auto_map) asks to run models/custom/modeling_custom.py: set model.trust_remote_code: "
            "true only if you have read that code and trust it, or use a model transformers ships")
    assert not marker.exists()


def test_missing_weights(ws):
    (ws / "models/tiny/model.safetensors").unlink()
    assert refused(ws, "train") == (
        "finetune train: error: model.name_or_path: cannot load 'models/tiny': Error no file named "
        "model.safetensors found in directory models/tiny.")


def test_missing_model_folder(ws):
    shutil.rmtree(ws / "models/tiny")
    assert refused(ws, "train") == (
        "finetune train: error: model.name_or_path: models/tiny does not exist (a local model is a "
        "folder under models/ with config.json and safetensors weights)")


# --- encodings ------------------------------------------------------------------------------

def records(ws: Path) -> list[dict]:
    return [json.loads(line) for line in (ws / "data/raw/dialogues.jsonl").read_text().splitlines()]


def prepared(ws: Path) -> dict[str, str]:
    return {k: v for k, v in snapshot(ws).items() if k.startswith("data/prepared/")}


@pytest.mark.parametrize("form", ["jsonl", "json", "csv"])
def test_utf8_with_bom_and_crlf_reads_like_plain_utf8(ws, form):
    """What Windows tools and spreadsheet exports write: the same records, the same splits."""
    expected = prepared(ws)
    rows = records(ws)
    path = ws / f"data/raw/windows.{form}"
    if form == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows)
    elif form == "json":
        text = json.dumps(rows, ensure_ascii=False, indent=1).replace("\n", "\r\n")
    else:
        path.write_text("")
        with path.open("w", encoding="utf-8", newline="") as f:  # csv writes \r\n itself
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        text = path.read_text(encoding="utf-8")
    path.write_bytes(codecs.BOM_UTF8 + text.encode("utf-8"))
    set_params(ws, data={"path": f"data/raw/windows.{form}"})
    proc = finetune(ws, "prepare")
    assert proc.returncode == 0, proc.stderr
    assert prepared(ws) == expected


@pytest.mark.parametrize("form, where", [("jsonl", "line 1: byte 0 is not valid UTF-8; "),
                                         ("csv", "line 1: not UTF-8 text (byte 0); ")])
def test_other_encodings_name_the_line_with_a_hint(ws, form, where):
    path = ws / f"data/raw/utf16.{form}"
    if form == "jsonl":
        text = "".join(json.dumps(r) + "\n" for r in records(ws))
    else:
        text = "id,dialogue,summary\nd1,hello,hi\n"
    path.write_bytes(text.encode("utf-16"))
    set_params(ws, data={"path": f"data/raw/utf16.{form}"})
    hint = "re-save the file as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8, or Excel's 'CSV UTF-8')"
    suffix = " (set data.on_bad_record: skip to drop such records)" if form == "jsonl" else ""
    assert refused(ws, "prepare") == f"finetune prepare: error: data/raw/utf16.{form} {where}{hint}{suffix}"


# --- foreign files --------------------------------------------------------------------------

def test_link_to_a_file_outside_the_repository_is_refused_unless_allowed(ws, tmp_path):
    outside = tmp_path / "elsewhere.jsonl"
    shutil.move(ws / "data/raw/dialogues.jsonl", outside)
    (ws / "data/raw/dialogues.jsonl").symlink_to(outside)
    for stage in ("check", "prepare", "tokenize"):  # check: before dvc repro starts
        assert refused(ws, stage) == (
            f"finetune {stage}: error: data/raw/dialogues.jsonl is a symlink to {outside}, outside "
            "the repository: copy it into the repository, or set data.allow_external_links: true")

    set_params(ws, data={"allow_external_links": True})
    proc = finetune(ws, "prepare")
    assert proc.returncode == 0, proc.stderr
    assert f"data.allow_external_links is on: reading data/raw/dialogues.jsonl -> {outside}" in proc.stderr


def test_linked_model_folder_outside_the_repository_is_refused(ws, tiny_model):
    shutil.rmtree(ws / "models/tiny")
    (ws / "models/tiny").symlink_to(tiny_model)
    assert refused(ws, "train") == (
        f"finetune train: error: models/tiny is a symlink to {tiny_model}, outside the repository: "
        "copy it into the repository, or set data.allow_external_links: true")


def test_dvc_links_into_a_shared_cache_are_dvcs_own(ws, tmp_path):
    """`cache.type: symlink` with a cache outside the repository: DVC's links are not foreign."""
    run(["dvc", "cache", "dir", str(tmp_path / "shared-cache")], ws)
    run(["dvc", "config", "cache.type", "symlink"], ws)
    shutil.copy(ws / "data/raw/dialogues.jsonl", ws / "data/raw/more.jsonl")
    run(["dvc", "add", "data/raw/more.jsonl"], ws)
    assert (ws / "data/raw/more.jsonl").resolve().is_relative_to(tmp_path / "shared-cache")
    proc = finetune(ws, "prepare")
    assert proc.returncode == 0, proc.stderr


def test_outputs_dvc_checked_out_as_links_are_replaced(ws):
    """With `cache.type: symlink`, DVC checks outputs out as links into its cache: a stage run
    by hand replaces them (only the link goes), where it refuses a link of anyone else's."""
    run(["dvc", "config", "cache.type", "symlink"], ws)
    run(["dvc", "commit", "--force", "prepare"], ws)  # the stages ran in-process: nothing cached yet
    run(["dvc", "checkout", "--relink", "prepare"], ws)
    assert (ws / WS.metrics("prepare")).is_symlink()
    proc = finetune(ws, "prepare")
    assert proc.returncode == 0, proc.stderr
    assert not (ws / WS.metrics("prepare")).is_symlink()


def test_link_inside_the_repository_is_fine(ws):
    (ws / "data/raw/alias.jsonl").symlink_to("dialogues.jsonl")
    set_params(ws, data={"path": "data/raw/alias.jsonl"})
    proc = finetune(ws, "prepare")
    assert proc.returncode == 0, proc.stderr


# --- kill -9 --------------------------------------------------------------------------------

@pytest.mark.slow
def test_kill_9_while_export_writes_leaves_the_outputs_as_they_were(ws):
    """SIGKILL while the merged model is being written: no output moves into place, and the
    temporary folder the killed process left is removed by the next run."""
    # As a workspace before its first export: the rerun below must write the merged model.
    shutil.rmtree(ws / "artifacts/merged")
    before = snapshot(ws)
    # A real process: SIGSTOP and SIGKILL are the point.
    proc = subprocess.Popen(["finetune", "export"], cwd=ws, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + KILL_WAIT_S
    while not (partial := list((ws / "artifacts").glob(".merged.tmp-*"))):
        assert proc.poll() is None, "export ended before it wrote anything"
        assert time.monotonic() < deadline
        time.sleep(0.001)
    # Stopped first, so the check that it is still mid-write holds until the kill.
    proc.send_signal(signal.SIGSTOP)
    assert partial[0].exists(), "export finished writing before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = f"artifacts/{partial[0].name}"
    assert partial[0].is_dir()
    assert {k: v for k, v in snapshot(ws).items() if not k.startswith(left)} == before

    rerun = finetune(ws, "export")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not partial[0].exists() and (ws / "artifacts/merged/model.safetensors").is_file()
