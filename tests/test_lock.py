"""The committed dvc.lock is what this commit computes.

The quickstart (`dvc repro` on the shipped params.yaml, as `make run` does) runs in a copy of
the repository's tracked files, and every stage's recorded dependencies, params and outputs
must come out as dvc.lock says. A stale lock (code changed, lock not regenerated) or outputs
that differ on this machine fail here, naming the stage and the file. Stage processes hold
the CPU math libraries to one instruction-set path (tasks/__init__.py), so the lock written
on one x86-64 machine is what any other computes.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import REPO, run

FIX = ("if the change was intended, commit the dvc.lock that `make run` writes "
       "(in a clean checkout of this commit)")


def tracked_copy(dst: Path) -> Path:
    """The repository's tracked files as they are in the working tree, in a fresh git repo."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    run(["git", "init", "-q"], dst)
    return dst


def _entries(lock: dict[str, Any]) -> dict[tuple[str, str, str], Any]:
    """(stage, kind, name) -> what dvc.lock records for it: a dependency's or output's hash,
    or a params file's values."""
    out: dict[tuple[str, str, str], Any] = {}
    for stage, entry in (lock.get("stages") or {}).items():
        for kind in ("deps", "outs"):
            for item in entry.get(kind, []):
                out[(stage, kind, item["path"])] = item.get("md5")
        for params_file, values in (entry.get("params") or {}).items():
            out[(stage, "params", params_file)] = values
        out[(stage, "cmd", "")] = entry.get("cmd")
    return out


def lock_differences(committed: dict[str, Any], computed: dict[str, Any]) -> list[str]:
    """One line per stage entry that differs between two dvc.lock files."""
    old, new = _entries(committed), _entries(computed)
    lines = []
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) != new.get(key):
            stage, kind, name = key
            what = {"deps": f"dependency {name}", "outs": f"output {name}",
                    "params": f"params of {name}", "cmd": "command"}[kind]
            if kind in ("deps", "outs"):
                change = f"{old.get(key)} in dvc.lock, {new.get(key)} computed"
            else:
                change = "differ"
            lines.append(f"stage {stage}: {what}: {change}")
    return lines


def test_lock_differences_name_stage_and_file():
    """The comparison itself, on a planted stale lock: a changed output and a changed code
    dependency are each named with their stage."""
    committed = yaml.safe_load((REPO / "dvc.lock").read_text())
    stale = yaml.safe_load((REPO / "dvc.lock").read_text())
    stale["stages"]["train"]["outs"][0]["md5"] = "0" * 32 + ".dir"
    stale["stages"]["prepare"]["deps"][0]["md5"] = "f" * 32
    out_path = stale["stages"]["train"]["outs"][0]["path"]
    dep_path = stale["stages"]["prepare"]["deps"][0]["path"]
    assert lock_differences(committed, committed) == []
    found = lock_differences(stale, committed)
    assert len(found) == 2
    assert f"stage prepare: dependency {dep_path}: {'f' * 32} in dvc.lock" in found[0]
    assert f"stage train: output {out_path}: {'0' * 32}.dir in dvc.lock" in found[1]


@pytest.mark.e2e
def test_committed_lock_is_what_the_quickstart_computes(tmp_path):
    repo = tracked_copy(tmp_path / "clone")
    committed = yaml.safe_load((repo / "dvc.lock").read_text())
    run(["dvc", "repro"], repo)
    found = lock_differences(committed, yaml.safe_load((repo / "dvc.lock").read_text()))
    assert not found, "dvc.lock is not what this commit computes:\n  " + "\n  ".join(found) + f"\n{FIX}"


# mkl_cbwr_get's query for the branch in use, and two branches' values (mkl_cbwr.h).
MKL_CBWR_BRANCH, MKL_CBWR_AUTO, MKL_CBWR_COMPATIBLE = 1, 2, 3
X86 = platform.machine() in ("x86_64", "AMD64")
MKL_BRANCH = """
import ctypes, sys
from pathlib import Path
import tasks
tasks.use_cpu_math(sys.argv[1])
import torch
torch.ones(2, 2) @ torch.ones(2, 2)  # MKL reads MKL_CBWR at its first call
lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
print(getattr(lib, "mkl_serv_cbwr_get", lambda _: -1)(1), torch.backends.cpu.get_cpu_capability())
"""


def mkl_branch_and_capability(mode: str) -> tuple[int, str]:
    """What MKL and ATen run in a fresh process under model.cpu_math `mode`, not what was
    asked: MKL ignores a branch it does not honour on this CPU without a word (MKL_CBWR=AVX2
    on an AMD CPU runs AUTO), which is how a lock written on an AMD EPYC came to differ on a
    Xeon."""
    out = subprocess.run([sys.executable, "-c", MKL_BRANCH, mode], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split()
    if out[0] == "-1":
        pytest.skip("this torch build does not use MKL")
    return int(out[0]), out[1]


@pytest.mark.skipif(not X86, reason="the pins name x86-64 code paths")
def test_portable_cpu_math_runs_on_the_pinned_paths():
    assert mkl_branch_and_capability("portable") == (MKL_CBWR_COMPATIBLE, "AVX2")


@pytest.mark.skipif(not X86, reason="the pins name x86-64 code paths")
def test_native_cpu_math_lets_each_library_pick():
    branch, capability = mkl_branch_and_capability("native")
    assert branch == MKL_CBWR_AUTO
    assert capability in ("AVX2", "AVX512")


def test_cpu_math_cannot_change_once_torch_is_loaded():
    """In-process stage runs (the tests) keep the math torch loaded with; another mode there
    is refused by name rather than silently ignored."""
    import torch  # noqa: F401  (loaded, as in any in-process stage run)

    import tasks
    from tasks.errors import PipelineError

    other = next(mode for mode in tasks.CPU_MATH if mode != tasks.DEFAULT_CPU_MATH)
    with pytest.raises(PipelineError, match="model.cpu_math is 'native'.*own process"):
        tasks.use_cpu_math(other)
    tasks.use_cpu_math(tasks.DEFAULT_CPU_MATH)  # the mode already in force: nothing to do


@pytest.mark.parametrize("optim, cpu_math, runs", [
    ("paged_adamw_8bit", "portable", "adamw_torch_fused"),  # CUDA-only: the CPU fallback
    ("adamw_torch", "portable", "adamw_torch_fused"),
    ("adamw_torch", "native", "adamw_torch"),
    ("sgd", "portable", "sgd"),
])
def test_portable_cpu_runs_adamw_fused(optim, cpu_math, runs):
    """torch's unfused AdamW takes its square roots through MKL's vector math, whose bytes
    differ between AVX2 and AVX-512 CPUs whatever MKL_CBWR says (found under QEMU:
    BENCHMARKS.md); the fused kernel is ATen's, held to AVX2. The Trainer is handed the fused
    one on a CPU under portable math."""
    from transformers import Trainer, TrainingArguments

    from tasks.config import parse_params
    from tasks.training import optim_name

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"]["optim"], raw["model"]["cpu_math"] = optim, cpu_math
    name = optim_name(parse_params(raw, "params.yaml"))
    assert name == runs
    if name.startswith("adamw"):
        _, kwargs = Trainer.get_optimizer_cls_and_kwargs(TrainingArguments("out", optim=name, use_cpu=True))
        assert kwargs.get("fused", False) == name.endswith("_fused")
