"""`make gpu-check`: one command that proves the GPU path on any CUDA host.

    python bench/gpu_check.py run                      # everything, on a CUDA host (make gpu-check)
    python bench/gpu_check.py run --parts env,quickstart
    python bench/gpu_check.py wheels                   # here: the wheels a bare GPU image lacks, into .whl/
    python3 bench/gpu_check.py install                 # there: install .whl/ into /tmp/site
    python bench/gpu_check.py report reports/gpu-check/results.jsonl   # the markdown table again

`run` does, in one go, each part one or more JSON lines in `--out`/results.jsonl, then a
markdown table (results.md) for BENCHMARKS.md:
  env          torch, CUDA, GPU, bf16, flash-attn, and every stage package against the lock;
  quickstart   prepare, tokenize, train, evaluate, export of the shipped quickstart on the GPU
               (the stages as a user runs them, `finetune STAGE`, with params.yaml unchanged:
               precision auto = bf16, paged_adamw_8bit, sdpa), checking what the CPU run
               checks: tuned beats base, merged equals adapter (export refuses otherwise),
               and a forced rerun of train is byte-identical or within RERUN_METRIC_ATOL;
  bench-1b     bench/gpu.py on a Llama-3.2-1B-shaped model: the train stage's trainer
  bench-8b     against a plain TRL SFTTrainer script, tokens/s, MFU, peak memory vs estimate;
  padding-free with flash-attn importable: padding_free true vs padded, on the 1B shape;
  profile-1b   the 1B shape again with torch.profiler over steps 10-11: each side's top ops
               by GPU self time per step (where ours loses to TRL).
A part that fails is recorded with its error and the rest still run; the exit code is 1 then.

The lent GPU machines have no network and a Python (3.12) with torch, transformers, peft and
accelerate but without bitsandbytes, trl, datasets, pydantic, evaluate or rouge_score.
`wheels` downloads, here, every package the stages import that the image's own heavy binaries
(FROM_IMAGE) do not cover, at the lock's versions and hashes, and drops from bitsandbytes'
wheel the libraries of other CUDA versions (43 MB -> a few MB), so everything travels in one
call within the 64 MiB limit. BENCHMARKS.md has the exact device calls.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.check_env import LOCK, PIN, canonical  # noqa: E402

PARTS = ("env", "quickstart", "bench-1b", "bench-8b", "padding-free", "profile-1b", "profile-1b-ckpt")
# profile-1b: bench/gpu.py's torch.profiler window on the 1B shape, after its warm-up steps
# (the first H200 run had ours at 0.89x TRL there, without a breakdown).
PROFILE_ARGS = ["--profile", "10:12", "--steps", "14"]
# profile-1b-ckpt: both sides with gradient checkpointing (the same recompute), later in the
# run; the second H200 session measured ours at 0.66x TRL so, with GPU kernels that did not
# explain it: each line also has wall, CPU and GPU milliseconds per step.
PROFILE_CKPT_ARGS = ["--checkpointing", "true", "--profile", "20:22", "--steps", "24"]
BENCH_MODELS = {"bench-1b": "llama-3.2-1b", "bench-8b": "llama-3.1-8b"}
# bench/gpu.py settings per shape: 2048-token rows; the 8B's batch of 2 leaves room on a
# 40 GB card, and 20 steps keep its part inside one 10-minute device call.
BENCH_ARGS = {"llama-3.2-1b": ["--seq", "2048", "--batch", "4", "--steps", "30"],
              "llama-3.1-8b": ["--seq", "2048", "--batch", "2", "--steps", "20"]}
DEFAULT_OUT = REPO / "reports" / "gpu-check"
WHEEL_DIR = REPO / ".whl"
SITE = Path("/tmp/site")
# The device tool carries at most this much (working tree + carried paths) per call.
CARRY_LIMIT_MIB = 64
# What the quickstart's stages import (tasks/*.py); their dependencies follow from the lock's
# "# via" lines. datasketch: prepare's leakage check (missing here, the first GPU run's
# quickstart stopped at prepare).
STAGE_ROOTS = ("transformers", "peft", "trl", "datasets", "bitsandbytes", "accelerate",
               "pydantic", "evaluate", "rouge-score", "ruamel-yaml", "pyyaml", "tokenizers",
               "safetensors", "huggingface-hub", "tqdm", "packaging", "datasketch")
# Large binary packages the GPU image ships (KINDS.md, image 'cuda', 2026-11-17) that the
# stages use only through stable APIs: taken from the image instead of carried (numpy 16 MB,
# pyarrow 45 MB, pandas 12 MB, scipy 35 MB would not fit beside the rest).
FROM_IMAGE = {"torch", "numpy", "pyarrow", "pandas", "scipy"}
# Published as a source archive only (pure Python): built into a wheel here.
SDIST_ONLY = {"rouge-score"}
# The GPU image's torch is built for CUDA 13.0: bitsandbytes loads libbitsandbytes_<backend>.so.
BNB_KEEP = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so")
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
# Forced rerun of train on CUDA: bitsandbytes' 4-bit matmul backward and cuBLAS split-K
# reductions are not bitwise deterministic, so the rerun may differ in the last bits; what
# must hold is the result: the tuned ROUGE-L within this of the first run's.
RERUN_METRIC_ATOL = 0.02
BENCH_TIMEOUT_S = {"llama-3.2-1b": 900, "llama-3.1-8b": 1800}
STAGE_TIMEOUT_S = 1800
QUICKSTART_STAGES = ("prepare", "tokenize", "train", "evaluate", "export")


# ---------------------------------------------------------------- the wheels a bare image lacks

def lock_entries(text: str, env: dict[str, str] | None = TARGET) -> dict[str, dict[str, Any]]:
    """{name: {version, hashes, via}} for the lock's pins whose markers hold in `env` (None:
    this interpreter)."""
    from packaging.markers import Marker

    entries: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    in_via = False
    for line in text.splitlines():
        m = PIN.match(line)
        if m:
            holds = not m.group(3) or Marker(m.group(3)).evaluate(env)
            current = {"version": m.group(2), "hashes": [], "via": []}
            if holds:
                entries[canonical(m.group(1))] = current
            in_via = False
            continue
        s = line.strip()
        if current is None:
            continue
        if s.startswith("--hash="):
            current["hashes"].append(s.removeprefix("--hash=").rstrip(" \\"))
        elif s.startswith("# via"):
            rest = s.removeprefix("# via").strip()
            if rest:
                current["via"].append(canonical(rest.split()[0]))
            in_via = not rest
        elif in_via and s.startswith("#   "):
            current["via"].append(canonical(s[4:].split()[0]))
    return entries


def stage_closure(entries: dict[str, dict[str, Any]]) -> list[str]:
    """STAGE_ROOTS and everything they need, by the lock's own "# via" annotations."""
    wanted = {canonical(r) for r in STAGE_ROOTS}
    missing = wanted - set(entries)
    if missing:
        raise SystemExit(f"gpu_check: {LOCK.name} has no pin for {sorted(missing)}: run `make lock`")
    grew = True
    while grew:
        grew = False
        for name, entry in entries.items():
            if name not in wanted and wanted.intersection(entry["via"]):
                wanted.add(name)
                grew = True
    return sorted(wanted)


def to_carry(lock_text: str) -> dict[str, dict[str, Any]]:
    """The locked pins (version + hashes) that travel to a bare GPU image."""
    entries = lock_entries(lock_text)
    return {n: entries[n] for n in stage_closure(entries) if n not in FROM_IMAGE}


def requirements_text(carry: dict[str, dict[str, Any]]) -> str:
    return "".join(f"{name}=={e['version']} " + " ".join(f"--hash={h}" for h in e["hashes"]) + "\n"
                   for name, e in sorted(carry.items()))


def slim_wheel(wheel: Path, keep: tuple[str, ...] = BNB_KEEP) -> int:
    """Drop the native libraries of other backends from a wheel, rewriting its RECORD so the
    wheel stays valid. Returns the bytes saved."""
    before = wheel.stat().st_size
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        dropped = {i.filename for i in src.infolist()
                   if i.filename.endswith(".so") and Path(i.filename).name.startswith("libbitsandbytes_")
                   and Path(i.filename).name not in keep}
        for info in src.infolist():
            if info.filename in dropped:
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(keepends=True)
                               if line.split(",")[0] not in dropped).encode()
            dst.writestr(info, data)
    slim.replace(wheel)
    return before - wheel.stat().st_size


def download_wheels(dest: Path) -> dict[str, Any]:
    """Download the wheels to carry (hash-checked by pip), slim bitsandbytes, return the plan."""
    carry = to_carry(LOCK.read_text())
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    pip = [sys.executable, "-m", "pip"]
    quiet = ["--quiet", "--no-deps", "--require-hashes"]
    binary, source = dest / "requirements.txt", dest / "requirements-sdist.txt"
    binary.write_text(requirements_text({n: e for n, e in carry.items() if n not in SDIST_ONLY}))
    source.write_text(requirements_text({n: e for n, e in carry.items() if n in SDIST_ONLY}))
    subprocess.run([*pip, "download", *quiet, "--only-binary=:all:", "--python-version",
                    TARGET["python_version"], "--implementation", "cp",
                    *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(dest), "-r", str(binary)],
                   check=True)
    subprocess.run([*pip, "wheel", *quiet, "-w", str(dest), "-r", str(source)], check=True)
    saved = sum(slim_wheel(w) for w in dest.glob("bitsandbytes-*.whl"))
    return plan(dest, saved)


def plan(dest: Path, saved: int = 0) -> dict[str, Any]:
    wheels = sorted(dest.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    tree = tracked_bytes()
    return {"wheels": len(wheels), "wheels_mib": round(total / 2**20, 1),
            "tree_mib": round(tree / 2**20, 1), "slimmed_mib": round(saved / 2**20, 1),
            "calls": 1 if total + tree <= CARRY_LIMIT_MIB * 2**20 else None,
            "from_image": sorted(FROM_IMAGE)}


def tracked_bytes() -> int:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=False).stdout
    return sum((REPO / f).stat().st_size for f in files.decode().split("\0") if f and (REPO / f).is_file())


def install(wheels: Path, target: Path) -> None:
    """On the GPU host: the carried wheels into `target` (then PYTHONPATH=target)."""
    found = sorted(wheels.glob("*.whl"))
    if not found:
        raise SystemExit(f"gpu_check: no wheels in {wheels}: run `python bench/gpu_check.py wheels` here first")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                    "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(target),
                    *map(str, found)], check=True)
    print(json.dumps({"installed": len(found), "target": str(target)}))


# ---------------------------------------------------------------- the check

def versions_against_lock() -> dict[str, Any]:
    from importlib import metadata

    entries = lock_entries(LOCK.read_text(), env=None)
    out = {}
    for name in STAGE_ROOTS:
        try:
            got = metadata.version(name)
        except metadata.PackageNotFoundError:
            got = None
        want = entries.get(canonical(name), {}).get("version")
        out[canonical(name)] = got if got == want else f"{got} (lock {want})"
    return out


def part_env() -> list[dict[str, Any]]:
    import torch

    cuda = torch.cuda.is_available()
    try:
        import flash_attn  # noqa: F401
        flash = getattr(flash_attn, "__version__", "yes")
    except ImportError:
        flash = None
    return [{"name": "env", "python": platform.python_version(), "torch": torch.__version__,
             "cuda": torch.version.cuda, "device": torch.cuda.get_device_name() if cuda else "cpu",
             "capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
             "bf16": cuda and torch.cuda.is_bf16_supported(), "flash_attn": flash,
             "packages": versions_against_lock()}]


def stage_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def finetune(stage: str, ws: Path, log: Path) -> float:
    """`finetune STAGE` as a user runs it, in `ws`; returns its wall time."""
    start = time.perf_counter()
    with log.open("a") as out:
        proc = subprocess.run([sys.executable, "-m", "tasks.cli", stage], cwd=ws, env=stage_env(),
                              stdout=out, stderr=subprocess.STDOUT, timeout=STAGE_TIMEOUT_S)
    if proc.returncode:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"finetune {stage} exited {proc.returncode}:\n" + "\n".join(tail))
    return round(time.perf_counter() - start, 2)


def quickstart_workspace(root: Path, max_steps: int | None) -> Path:
    """The shipped quickstart: data/raw, models, params.yaml (max_steps overridable, for the
    CPU test of this script)."""
    import yaml

    ws = root / "quickstart"
    ws.mkdir(parents=True)
    for part in ("data/raw", "models"):
        shutil.copytree(REPO / part, ws / part)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    if max_steps is not None:
        raw["train"]["max_steps"] = max_steps
    (ws / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return ws


def adapter_difference(a: Path, b: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    fa, fb = a / "adapter_model.safetensors", b / "adapter_model.safetensors"
    if fa.read_bytes() == fb.read_bytes():
        return {"bytes_identical": True, "max_abs_diff": 0.0}
    ta, tb = load_file(fa), load_file(fb)
    diff = max((ta[k].float() - tb[k].float()).abs().max().item() for k in ta)
    return {"bytes_identical": False, "max_abs_diff": diff}


def part_quickstart(root: Path, max_steps: int | None) -> list[dict[str, Any]]:
    ws = quickstart_workspace(root, max_steps)
    log = root / "quickstart.log"
    walls = {stage: finetune(stage, ws, log) for stage in QUICKSTART_STAGES}
    first = json.loads((ws / "metrics/eval.json").read_text())
    export = json.loads((ws / "metrics/export.json").read_text())
    train = json.loads((ws / "metrics/train.json").read_text())
    kept = root / "adapter-first"
    shutil.copytree(ws / "artifacts/adapter", kept)
    rerun_wall = finetune("train", ws, log)
    finetune("evaluate", ws, log)
    second = json.loads((ws / "metrics/eval.json").read_text())
    base, tuned = first["base"]["rougeL"]["mean"], first["tuned"]["rougeL"]["mean"]
    rerun = {**adapter_difference(kept, ws / "artifacts/adapter"),
             "tuned_rougeL": second["tuned"]["rougeL"]["mean"]}
    rerun["metric_diff"] = abs(rerun["tuned_rougeL"] - tuned)
    checks = {"tuned_beats_base": tuned > base,
              "merged_equals_adapter": export.get("merged") is True,
              "rerun_within_tolerance": rerun["bytes_identical"] or rerun["metric_diff"] <= RERUN_METRIC_ATOL}
    return [{"name": "quickstart", "ok": all(checks.values()), "checks": checks,
             "rougeL": {"base": base, "tuned": tuned}, "export_scores": export.get("scores"),
             "logits_max_abs_diff": export.get("logits_max_abs_diff"),
             "train": {k: train.get(k) for k in ("steps", "tokens_seen", "final_loss", "estimated_peak_memory_gib")},
             "wall_s": walls, "rerun": {**rerun, "train_wall_s": rerun_wall,
                                        "metric_atol": RERUN_METRIC_ATOL}}]


def part_bench(model: str, extra: list[str], steps: int | None) -> list[dict[str, Any]]:
    cmd = [sys.executable, str(REPO / "bench/gpu.py"), "--model", model, *BENCH_ARGS[model], *extra]
    if steps is not None:  # argparse keeps the last --steps
        cmd += ["--steps", str(steps)]
    proc = subprocess.run(cmd, cwd=REPO, env=stage_env(), capture_output=True, text=True,
                          timeout=BENCH_TIMEOUT_S.get(model))
    # Trainer prints its own log dicts (single-quoted) to stdout too.
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"')]
    if proc.returncode:
        raise RuntimeError(f"bench/gpu.py --model {model} {' '.join(extra)} exited {proc.returncode}:\n"
                           + "\n".join(proc.stderr.splitlines()[-15:]))
    return lines


def flash_attn_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def run_part(part: str, root: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    if part == "env":
        return part_env()
    if part == "quickstart":
        return part_quickstart(root, args.max_steps)
    if part in BENCH_MODELS:
        return part_bench(BENCH_MODELS[part], [], args.bench_steps)
    if part == "profile-1b":
        return part_bench(BENCH_MODELS["bench-1b"], PROFILE_ARGS, None)
    if part == "profile-1b-ckpt":
        return part_bench(BENCH_MODELS["bench-1b"], PROFILE_CKPT_ARGS, None)
    if part == "padding-free":
        if not flash_attn_available():
            return [{"name": "padding-free", "skipped": "flash_attn is not importable on this host"}]
        return [line for padding_free in ("true", "false") for line in part_bench(
            BENCH_MODELS["bench-1b"], ["--attn", "flash_attention_2", "--padding-free", padding_free,
                                       "--only", "ours"], args.bench_steps)]
    raise AssertionError(part)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run(args: argparse.Namespace) -> int:
    if not cuda_available() and not args.allow_cpu:
        print("gpu_check: no CUDA device here; this check is for a CUDA host (see BENCHMARKS.md, "
              "'GPU check'); --allow-cpu runs its CPU-capable parts anyway", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    results.write_text("")
    failed = False
    with tempfile.TemporaryDirectory(prefix="finetune-gpu-check-") as tmp:
        for part in args.parts:
            start = time.perf_counter()
            try:
                lines = run_part(part, Path(tmp) / part, args)
            except Exception as err:  # a part's failure is a result; the others still run
                lines = [{"name": part, "ok": False, "error": f"{type(err).__name__}: {err}"}]
            failed |= any(line.get("ok") is False for line in lines)
            for line in lines:
                line.setdefault("part", part)
                line.setdefault("part_wall_s", round(time.perf_counter() - start, 1))
                text = json.dumps(line)
                print(text, flush=True)
                with results.open("a") as f:
                    f.write(text + "\n")
    (args.out / "results.md").write_text(markdown(read_results(results)))
    print(f"gpu_check: {results} and {args.out / 'results.md'}", file=sys.stderr)
    return 1 if failed else 0


# ---------------------------------------------------------------- the table for BENCHMARKS.md

def read_results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return "" if value is None else str(value)


def markdown(lines: list[dict[str, Any]]) -> str:
    """One table for the checks and one for the benchmarks, as BENCHMARKS.md shows them."""
    out = ["| part | result | details |", "| --- | --- | --- |"]
    bench = []
    for line in lines:
        if str(line.get("name", "")).startswith("gpu-train"):
            bench.append(line)
            continue
        if "skipped" in line:
            result, details = "skipped", line["skipped"]
        elif "error" in line:
            result, details = "FAILED", line["error"].splitlines()[0]
        elif line["name"] == "env":
            result = "info"
            details = _fmt({k: line.get(k) for k in ("device", "torch", "cuda", "python", "bf16", "flash_attn")})
        else:
            result = "ok" if line.get("ok") else "FAILED"
            details = _fmt({**line.get("checks", {}), "ROUGE-L": line.get("rougeL"),
                            "rerun": {k: line.get("rerun", {}).get(k)
                                      for k in ("bytes_identical", "max_abs_diff", "metric_diff")}})
        out.append(f"| {line.get('part', line['name'])} | {result} | {details} |")
    if bench:
        cols = ("name", "model", "attn", "padding_free", "gradient_checkpointing", "tokens_per_s", "ratio", "mfu_vs_989",
                "mfu_vs_measured", "peak_gib", "estimate_gib", "peak_over_estimate")
        out += ["", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
        out += ["| " + " | ".join(_fmt(b.get(c)) for c in cols) + " |" for b in bench]
    for b in bench:
        if b.get("profile_top"):
            out += ["", f"{b['name']} ({b.get('part')}), top ops per profiled step "
                    f"({_fmt(b.get('profile_totals') or {})}):", "",
                    "| op | self ms/step | calls/step |", "| --- | --- | --- |"]
            out += [f"| {op['op']} | {_fmt(op['self_ms_per_step'])} | {op['calls_per_step']} |"
                    for op in b["profile_top"]]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the check (a CUDA host)")
    r.add_argument("--parts", default=",".join(PARTS), type=_parts,
                   help=f"comma-separated, from {', '.join(PARTS)} (default: all)")
    r.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results.jsonl and results.md go here")
    r.add_argument("--max-steps", type=int, help="quickstart train.max_steps (default: params.yaml's)")
    r.add_argument("--bench-steps", type=int, help="bench/gpu.py --steps (default: its own)")
    r.add_argument("--allow-cpu", action="store_true", help="run without CUDA (to test this script)")
    w = sub.add_parser("wheels", help="download the wheels a bare GPU image lacks (run here)")
    w.add_argument("--dest", type=Path, default=WHEEL_DIR)
    i = sub.add_parser("install", help="install carried wheels (run on the GPU host)")
    i.add_argument("--wheels", type=Path, default=WHEEL_DIR)
    i.add_argument("--target", type=Path, default=SITE)
    rep = sub.add_parser("report", help="the markdown table of a results.jsonl")
    rep.add_argument("results", type=Path)
    return parser.parse_args(argv)


def _parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"unknown part(s) {unknown or text!r}; choose from {', '.join(PARTS)}")
    return parts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "run":
        return run(args)
    if args.command == "wheels":
        print(json.dumps(download_wheels(args.dest)))
        return 0
    if args.command == "install":
        install(args.wheels, args.target)
        return 0
    print(markdown(read_results(args.results)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
