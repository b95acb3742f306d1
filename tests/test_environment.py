"""The environment is part of the code: the venv holds exactly the lock, and the documented
commands parse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import run as bench_run
from scripts import check_env

REPO = Path(__file__).resolve().parents[1]


def test_installed_packages_equal_the_lock():
    assert check_env.differences() == []


def test_lock_pins_every_package_with_a_hash_and_leaves_torch_to_the_host():
    text = check_env.LOCK.read_text()
    pins = check_env.pins(check_env.LOCK)
    assert "torch" not in pins and not any(check_env.HOST_BUILD.match(n) for n in pins)
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if check_env.PIN.match(line):
            assert line.endswith("\\") and lines[i + 1].strip().startswith("--hash=sha256:"), line
    assert check_env.pins(check_env.TORCH).keys() == {"torch"}


def test_check_env_reports_a_drifted_package(tmp_path, monkeypatch):
    lock = tmp_path / "lock.txt"
    lock.write_text(check_env.LOCK.read_text().replace("\npyyaml==", "\npyyaml==0.0.1.dev0+", 1))
    monkeypatch.setattr(check_env, "LOCK", lock)
    monkeypatch.setattr(check_env, "ROOT", tmp_path.parent)
    problems = check_env.differences()
    assert len(problems) == 1 and problems[0].startswith("pyyaml: locked 0.0.1.dev0+")


def test_make_bench_without_arguments_runs_every_benchmark():
    assert bench_run.parse_args([]).names == list(bench_run.BENCHES)
    assert bench_run.parse_args([]).scale_rows == [10_000, 100_000, 1_000_000]
    assert bench_run.parse_args(["tokenize", "train"]).names == ["tokenize", "train"]
    args = bench_run.parse_args(["tokenize-scale", "--scale-rows", "1000", "2000"])
    assert (args.names, args.scale_rows) == (["tokenize-scale"], [1000, 2000])


def test_bench_refuses_an_unknown_name_in_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        bench_run.parse_args(["trian"])
    assert exc.value.code == 2
    assert "unknown benchmark trian; choose from train" in capsys.readouterr().err


def test_make_setup_picks_a_supported_interpreter():
    out = subprocess.run(["make", "-s", "--no-print-directory", "-f", "Makefile", "print-python"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    version = subprocess.run([out, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version in {"(3, 11)", "(3, 12)", "(3, 13)"}
    assert sys.version_info[:2] >= (3, 11)
