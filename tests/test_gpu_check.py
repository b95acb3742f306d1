"""`make gpu-check` must not arrive broken on the first GPU: its command line, the wheels it
carries to a bare GPU image, the wheel slimming, its report, and the TRL baseline of
bench/gpu.py, all checked on CPU. The CUDA parts themselves (bf16, paged_adamw_8bit, CUDA
bitsandbytes kernels, the 1B/8B shapes) need a GPU and run only there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bench import gpu_check
from scripts import check_env

REPO = Path(__file__).resolve().parents[1]


def test_run_takes_every_part_by_default_and_refuses_unknown_ones(capsys):
    assert gpu_check.parse_args(["run"]).parts == list(gpu_check.PARTS)
    assert gpu_check.parse_args(["run", "--parts", "env, quickstart"]).parts == ["env", "quickstart"]
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(["run", "--parts", "env,quikstart"])
    assert exc.value.code == 2
    assert "unknown part(s) ['quikstart']; choose from env, quickstart" in capsys.readouterr().err


def test_wheels_cover_every_stage_import_at_the_locked_versions_and_hashes():
    carry = gpu_check.to_carry(check_env.LOCK.read_text())
    # Every version the lock pins for a name, whatever the markers: the wheels are for the GPU
    # host's Python (3.12), which need not be the one running this test.
    locked: dict[str, set[str]] = {}
    for line in check_env.LOCK.read_text().splitlines():
        if m := check_env.PIN.match(line):
            locked.setdefault(check_env.canonical(m.group(1)), set()).add(m.group(2))
    roots = {check_env.canonical(r) for r in gpu_check.STAGE_ROOTS}
    assert roots - gpu_check.FROM_IMAGE <= carry.keys()
    # What the stages' own dependencies need comes along (found through the lock's "# via").
    assert {"pydantic-core", "annotated-types", "dill", "multiprocess", "nltk"} <= carry.keys()
    assert not gpu_check.FROM_IMAGE & carry.keys()
    assert not any(check_env.HOST_BUILD.match(n) for n in carry)
    for name, entry in carry.items():
        assert entry["hashes"] and all(h.startswith("sha256:") for h in entry["hashes"]), name
        assert entry["version"] in locked.get(name, set()), name
    text = gpu_check.requirements_text(carry)
    assert text.count("\n") == len(carry) and "transformers==5.23.0 --hash=sha256:" in text


def test_wheel_markers_are_evaluated_for_the_gpu_hosts_python(tmp_path):
    lock = ("numpy==1.0 ; python_full_version < '3.12' \\\n    --hash=sha256:aa\n    # via pandas\n"
            "numpy==2.0 ; python_full_version >= '3.12' \\\n    --hash=sha256:bb\n    # via pandas\n"
            "pandas==3.0 \\\n    --hash=sha256:cc\n    # via\n    #   datasets\n    #   evaluate\n")
    entries = gpu_check.lock_entries(lock)
    assert entries["numpy"]["version"] == "2.0" and entries["numpy"]["hashes"] == ["sha256:bb"]
    assert entries["pandas"]["via"] == ["datasets", "evaluate"]


def test_slimming_drops_other_backends_and_keeps_the_wheel_installable(tmp_path):
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    libs = ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda118.so",
            "libbitsandbytes_rocm70.so"]
    files = {"bitsandbytes/__init__.py": b"__version__ = '0.50.2'\n",
             **{f"bitsandbytes/{lib}": os.urandom(4096) for lib in libs},
             "bitsandbytes-0.50.2.dist-info/METADATA": b"Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 0.50.2\n",
             "bitsandbytes-0.50.2.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: py3-none-any\n"}
    record = "".join(f"{name},,\n" for name in files) + "bitsandbytes-0.50.2.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("bitsandbytes-0.50.2.dist-info/RECORD", record)
    assert gpu_check.slim_wheel(wheel) > 0
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        kept_record = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert {"bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda130.so"} <= names
    assert not {"bitsandbytes/libbitsandbytes_cuda118.so", "bitsandbytes/libbitsandbytes_rocm70.so"} & names
    assert "cuda118" not in kept_record and "cuda130" in kept_record
    gpu_check.install(tmp_path, tmp_path / "site")  # what the GPU host runs: pip accepts it
    assert (tmp_path / "site/bitsandbytes/libbitsandbytes_cuda130.so").is_file()


def test_report_table_shows_checks_failures_skips_and_benchmarks():
    lines = [
        {"name": "env", "part": "env", "device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "cuda": "13.0",
         "python": "3.12.3", "bf16": True, "flash_attn": None},
        {"name": "quickstart", "part": "quickstart", "ok": True,
         "checks": {"tuned_beats_base": True, "merged_equals_adapter": True, "rerun_within_tolerance": True},
         "rougeL": {"base": 0.03, "tuned": 0.55},
         "rerun": {"bytes_identical": False, "max_abs_diff": 1.5e-05, "metric_diff": 0.0}},
        {"name": "bench-8b", "part": "bench-8b", "ok": False, "error": "RuntimeError: CUDA out of memory\nmore"},
        {"name": "padding-free", "part": "padding-free", "skipped": "flash_attn is not importable on this host"},
        {"name": "gpu-train-ours", "model": "llama-3.2-1b", "attn": "sdpa", "tokens_per_s": 12345.6,
         "mfu_vs_989": 0.31, "peak_gib": 9.5, "estimate_gib": 8.0, "peak_over_estimate": 1.188},
        {"name": "gpu-train-ratio", "model": "llama-3.2-1b", "attn": "sdpa", "ratio": 1.62},
    ]
    table = gpu_check.markdown(lines).splitlines()
    assert table[0] == "| part | result | details |"
    assert table[2].startswith("| env | info | device NVIDIA H100 80GB HBM3, torch 2.11.0, cuda 13.0")
    assert table[3] == ("| quickstart | ok | tuned_beats_base True, merged_equals_adapter True, "
                        "rerun_within_tolerance True, ROUGE-L base 0.03, tuned 0.55, rerun bytes_identical "
                        "False, max_abs_diff 1.5e-05, metric_diff 0 |")
    assert table[4] == "| bench-8b | FAILED | RuntimeError: CUDA out of memory |"
    assert table[5] == "| padding-free | skipped | flash_attn is not importable on this host |"
    assert table[7].startswith("| name | model | attn | padding_free | gradient_checkpointing | tokens_per_s | ratio |")
    assert table[9] == "| gpu-train-ours | llama-3.2-1b | sdpa |  |  | 1.235e+04 |  | 0.31 |  | 9.5 | 8 | 1.188 |"
    assert table[10].startswith("| gpu-train-ratio | llama-3.2-1b | sdpa |  |  |  | 1.62 |")


def test_run_refuses_without_cuda_and_writes_results_with_allow_cpu(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA: the refusal is for CPU hosts")
    assert gpu_check.main(["run", "--out", str(tmp_path)]) == 2
    assert "gpu_check: no CUDA device here" in capsys.readouterr().err
    assert gpu_check.main(["run", "--parts", "env", "--allow-cpu", "--out", str(tmp_path)]) == 0
    env = json.loads((tmp_path / "results.jsonl").read_text())
    assert env["name"] == "env" and env["device"] == "cpu"
    assert env["packages"]["transformers"] == check_env.pins(check_env.LOCK)["transformers"]
    assert (tmp_path / "results.md").read_text().startswith("| part | result | details |\n")


def test_gpu_bench_runs_ours_against_the_plain_trl_script():
    """bench/gpu.py on its tiny shape (CPU): both trainers train and report tokens/s, and
    the profiled step's top ops (CPU self time here; GPU self time on a GPU)."""
    proc = subprocess.run([sys.executable, "bench/gpu.py", "--model", "tiny", "--steps", "4", "--seq", "64",
                           "--batch", "2", "--warmup", "2", "--profile", "2:3"], cwd=REPO, capture_output=True,
                          text=True,
                          env={**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = {d["name"]: d for d in map(json.loads, (x for x in proc.stdout.splitlines() if x.startswith('{"')))}
    assert lines.keys() == {"gpu-train-ours", "gpu-train-baseline", "gpu-train-ratio"}
    assert lines["gpu-train-ours"]["tokens_per_s"] > 0 and lines["gpu-train-baseline"]["tokens_per_s"] > 0
    assert lines["gpu-train-ratio"]["ratio"] > 0
    for side in ("gpu-train-ours", "gpu-train-baseline"):
        top = lines[side]["profile_top"]
        assert top and all(op["self_ms_per_step"] >= 0 and op["calls_per_step"] >= 1 for op in top)
        assert any(op["op"] == "aten::mm" for op in top)
        totals = lines[side]["profile_totals"]
        assert totals["wall_ms_per_step"] > 0 and totals["cpu_ms_per_step"] > 0 and totals["gpu_ms_per_step"] is None
    table = gpu_check.markdown([{**lines["gpu-train-ours"], "part": "profile-1b"}])
    assert "gpu-train-ours (profile-1b), top ops per profiled step (wall_ms_per_step " in table
