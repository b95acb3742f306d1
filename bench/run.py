"""Benchmarks: the pipeline against plain code doing the same work, side by side in one run.

Each benchmark warms up, repeats, alternates ours and the baseline, and prints one JSON
object (name, ours, baseline, unit, ratio = ours / baseline, settings). Everything runs in a
temporary copy of the repository, prepared with the shipped params.yaml (the quickstart).

    make bench                                  # all of them
    python bench/run.py train-trl               # the train stage against a plain TRL SFTTrainer script
    python bench/run.py train tokenize evaluate orchestration
    python bench/run.py tokenize-scale --scale-rows 10000 100000   # tokenize at 10k and 100k rows
    python bench/run.py prepare-scale --scale-rows 10000 100000    # prepare (leakage check on) likewise
    python bench/run.py streaming-write         # writing a 5 GiB file as prepare does, against plain writes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tasks.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WARMUP_STEPS = 5  # training steps excluded from the rate (allocations, first-step compiles)
TRAIN_STEPS = 40
REPEATS = 3
TRL_REPEATS = 2  # train-trl: whole stage runs (params.yaml's 150 steps), alternating with the TRL script
TOKENIZE_COPIES = 10  # the 477 train rows, repeated, so one pass takes long enough to time
EVAL_PROMPTS = 48
ORCHESTRATION_REPEATS = 5  # runs spread over 15 s on a 2-core machine: a median of 3 is not enough
SCALE_ROWS = (10_000, 100_000, 1_000_000)  # generated rows per tokenize-scale and prepare-scale run
SCALE_SCENES = 4  # scenes per generated dialogue: about 950 bytes per prepared row
PREPARED_ROW_BYTES = 950  # a generated prepared row, as SCALE_SCENES makes it
WRITE_GIB = 5  # streaming-write: past the ~2 GB of a file after which plain writes got dearer here
SCALE_BASELINE_MAX_ROWS = 100_000  # the in-memory baselines hold every row: ~25 GB (tokenize) at 1M rows
REFERENCE_REPEATS = 3  # runs of the smallest size in a scale series: its median is the reference
SERVER_START_TIMEOUT = 120  # seconds


def env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "TQDM_DISABLE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


def sh(cmd: list[str], cwd: Path, **extra_env: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env={**env(), **extra_env}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def workspace() -> Path:
    """A git repo with the tracked files (plus bench/), prepared and tokenized."""
    ws = Path(tempfile.mkdtemp(prefix="finetune-bench-"))
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files + [str(p.relative_to(REPO)) for p in (REPO / "bench").glob("*.py")]:
        (ws / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, ws / f)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "bench"],
                ["finetune", "prepare"], ["finetune", "tokenize"]):
        sh(cmd, ws)
    return ws


def report(name: str, ours: float, baseline: float | None, unit: str, **settings: Any) -> dict[str, Any]:
    """One JSON line; `baseline` None where the baseline was not run (ratio null)."""
    result = {"name": name, "ours": round(ours, 3), "unit": unit,
              "baseline": None if baseline is None else round(baseline, 3),
              "ratio": None if baseline is None else round(ours / baseline, 3), **settings}
    print(json.dumps(result), flush=True)
    return result


# ---- train -------------------------------------------------------------------------------

class StepTimer:
    """A TrainerCallback: non-padding tokens/s after the warm-up steps, and peak RSS."""

    def __new__(cls, warmup_steps: int = WARMUP_STEPS):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.marks: list[tuple[float, int]] = []  # per timer: one process may run several

            def on_step_end(self, args, state, control, **kwargs):
                self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

            def on_train_end(self, args, state, control, **kwargs):
                (t0, n0), (t1, n1) = self.marks[warmup_steps - 1], self.marks[-1]
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                Path(os.environ["BENCH_OUT"]).write_text(json.dumps(
                    {"tokens_per_s": (n1 - n0) / (t1 - t0), "peak_rss_mib": peak}))

        return _Timer()


def _train_ours(steps: int, overrides: str) -> None:
    """Runs inside the workspace: the train stage's own Trainer, no checkpoints."""
    from tasks import train
    from tasks.config import load_params

    params = load_params()
    params = params.model_copy(update={"train": params.train.model_copy(
        update={"max_steps": steps, "save_steps": steps + 1, **json.loads(overrides)})})
    trainer = train.build_trainer(params, Workspace(), [])
    trainer.add_callback(StepTimer())
    trainer.train()


class RunTimer:
    """A TrainerCallback for whole runs (bench_train_trl): the Trainer's own train_runtime and
    non-padding tokens seen, the rate after the warm-up steps, and peak RSS, into BENCH_OUT."""

    def __new__(cls, warmup_steps: int = WARMUP_STEPS):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.marks: list[tuple[float, int]] = []
                self.runtime: float | None = None

            def on_step_end(self, args, state, control, **kwargs):
                self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "train_runtime" in logs:  # logged once, just before on_train_end
                    self.runtime = logs["train_runtime"]

            def on_train_end(self, args, state, control, **kwargs):
                (t0, n0), (t1, n1) = self.marks[warmup_steps - 1], self.marks[-1]
                Path(os.environ["BENCH_OUT"]).write_text(json.dumps({
                    "train_runtime": self.runtime, "tokens_seen": state.num_input_tokens_seen,
                    "steps": state.global_step, "tokens_per_s": state.num_input_tokens_seen / self.runtime,
                    "gradient_checkpointing": bool(args.gradient_checkpointing),
                    "steady_tokens_per_s": (n1 - n0) / (t1 - t0),
                    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))

        return _Timer()


def _stage_train(args: list[str]) -> int:
    """Runs inside the workspace: `finetune train` itself (checkpoints, evaluation, adapter
    and all), with a RunTimer added to the Trainer it builds; `args` go to the stage."""
    import transformers

    init = transformers.Trainer.__init__

    def timed_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(RunTimer())

    transformers.Trainer.__init__ = timed_init
    from tasks.cli import main as finetune

    return finetune(["train", *args])


def bench_train(ws: Path, name: str = "train", **overrides: Any) -> dict[str, Any]:
    """The train stage with the shipped params plus `overrides` (train section) against
    bench/plain_train.py."""
    from tasks.config import load_params

    from tasks.train import padding_free

    params = load_params(ws / "params.yaml")
    t = params.train.model_copy(update=overrides)
    packed = padding_free(params.model_copy(update={"train": t}))
    commands = {
        "ours": [sys.executable, "bench/run.py", "_train-ours", "--steps", str(TRAIN_STEPS),
                 json.dumps(overrides)],
        "baseline": [sys.executable, "bench/plain_train.py", "--steps", str(TRAIN_STEPS),
                     "--max-length", str(params.tokenize.max_length),
                     "--batch-size", str(t.per_device_train_batch_size),
                     "--lr", str(t.learning_rate), "--callback", "bench.run:StepTimer"],
    }
    runs: dict[str, list[dict[str, float]]] = {"ours": [], "baseline": []}
    for _ in range(REPEATS):
        for impl, cmd in commands.items():
            out = ws / f"bench-{impl}.json"
            subprocess.run(cmd, cwd=ws, env={**env(), "BENCH_OUT": str(out)}, check=True,
                           capture_output=True)
            runs[impl].append(json.loads(out.read_text()))
    med = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in runs.items()}
    peak = {k: statistics.median(r["peak_rss_mib"] for r in v) for k, v in runs.items()}
    return report(name, med["ours"], med["baseline"], "non-padding tokens/s",
                  peak_rss_mib=peak, steps=TRAIN_STEPS, warmup_steps=WARMUP_STEPS, repeats=REPEATS,
                  batch=t.per_device_train_batch_size, max_length=params.tokenize.max_length,
                  model=params.model.name_or_path, quant="nf4" if params.quant.load_in_4bit else None,
                  device="cpu", padding_free=packed, sampling=t.train_sampling_strategy,
                  baseline_is="bench/plain_train.py (pad to max_length)")


def bench_train_trl(ws: Path) -> dict[str, Any]:
    """`finetune train` against bench/trl_train.py, the plain TRL SFTTrainer script a user
    would write instead (the peer): the same prepared rows, params.yaml's steps, batch,
    learning rate, max_length, completion-only loss, LoRA, 4-bit and checkpoint settings.
    Each side is one whole process, run TRL_REPEATS times alternating; the rate is the
    Trainer's own: non-padding tokens seen / train_runtime (both sides see the same batches).

    SFTTrainer casts a 4-bit model's LoRA weights to bfloat16; on a CPU without native bf16
    (no AVX512-BF16/AMX) those matmuls are emulated and TRL runs at about half its speed, so
    the same script is also run with --fp32-adapters (baseline_fp32_adapters): about what TRL
    costs where bf16 is native, the ratio that carries over to such machines.

    train.gradient_checkpointing: auto turns checkpointing off where memory is plentiful (here);
    the script keeps TRL's default (on). ours_checkpointing runs the stage with it forced on:
    the two loops compared on equal settings."""
    from tasks.config import apply_overrides, load_params

    params = load_params(ws / "params.yaml")
    checkpointing = ws / "params-checkpointing.yaml"
    shutil.copyfile(ws / "params.yaml", checkpointing)
    apply_overrides(checkpointing, {"train": {"gradient_checkpointing": True}})
    trl = [sys.executable, "bench/trl_train.py", "--callback", "bench.run:RunTimer"]
    stage = [sys.executable, "bench/run.py", "_stage-train"]
    commands = {"ours": stage, "ours_checkpointing": [*stage, "--params", checkpointing.name],
                "baseline": trl, "baseline_fp32_adapters": [*trl, "--fp32-adapters"]}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in commands}
    for _ in range(TRL_REPEATS):
        for impl, cmd in commands.items():
            out = ws / f"bench-{impl}.json"
            load = os.getloadavg()[0]
            usage = measured(cmd, ws, BENCH_OUT=str(out))
            runs[impl].append({**json.loads(out.read_text()), **usage, "load_avg_1m_before": load})
    med = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in runs.items()}

    def each(key: str, digits: int = 1) -> dict[str, list[float]]:
        return {k: [round(r[key], digits) for r in v] for k, v in runs.items()}

    return report("train-trl", med["ours"], med["baseline"], "non-padding tokens/s (tokens_seen / train_runtime)",
                  target_ratio=1.3, baseline_fp32_adapters=round(med["baseline_fp32_adapters"], 3),
                  ratio_fp32_adapters=round(med["ours"] / med["baseline_fp32_adapters"], 3),
                  ours_checkpointing=round(med["ours_checkpointing"], 3),
                  ratio_equal_checkpointing=round(med["ours_checkpointing"] / med["baseline"], 3),
                  ratio_equal_checkpointing_fp32_adapters=round(
                      med["ours_checkpointing"] / med["baseline_fp32_adapters"], 3),
                  repeats=TRL_REPEATS, steps=params.train.max_steps,
                  batch=params.train.per_device_train_batch_size, max_length=params.tokenize.max_length,
                  tokens_seen=each("tokens_seen", 0), train_runtime_s=each("train_runtime", 2),
                  gradient_checkpointing={k: v[0]["gradient_checkpointing"] for k, v in runs.items()},
                  tokens_per_s=each("tokens_per_s"),
                  steady_tokens_per_s=each("steady_tokens_per_s"),  # after WARMUP_STEPS steps
                  wall_s=each("wall_s"), cpu_s=each("cpu_s"), peak_rss_mib=each("peak_rss_mib", 0),
                  load_avg_1m_before=each("load_avg_1m_before", 2),
                  model=params.model.name_or_path, quant="nf4" if params.quant.load_in_4bit else None,
                  device="cpu", baseline_is="bench/trl_train.py (trl.SFTTrainer, the plain TRL recipe)")


# ---- tokenize ------------------------------------------------------------------------------

def bench_tokenize(ws: Path) -> dict[str, Any]:
    import datasets

    from tasks import tokenize
    from tasks.config import load_params
    from tasks.io import read_jsonl
    from tasks.modeling import load_tokenizer

    datasets.disable_progress_bars()
    params = load_params(ws / "params.yaml")
    rows = read_jsonl(Workspace(ws).prepared / "train.jsonl") * TOKENIZE_COPIES
    rows = [{**r, "id": f"{r['id']}-{i}"} for i, r in enumerate(rows)]
    tok = load_tokenizer(params.model, str(ws / params.model.name_or_path))
    tokenize.set_pad_token(tok)

    def ours() -> None:
        out = Path(tempfile.mkdtemp(prefix="finetune-bench-tokenize-"))
        tokenize._tokenize_split(rows, tok, params, "train", out / "train")
        shutil.rmtree(out)

    def raw() -> None:
        tok([r["prompt"] + r["completion"] for r in rows])

    times: dict[str, list[float]] = {"ours": [], "baseline": []}
    ours(), raw()  # warm-up
    for _ in range(REPEATS + 2):
        for impl, fn in (("ours", ours), ("baseline", raw)):
            start = time.perf_counter()
            fn()
            times[impl].append(time.perf_counter() - start)
    rate = {k: len(rows) / statistics.median(v) for k, v in times.items()}
    return report("tokenize", rate["ours"], rate["baseline"], "rows/s", rows=len(rows),
                  repeats=REPEATS + 2, baseline_is="one batched tokenizer call on prompt+completion")


# ---- tokenize at scale ----------------------------------------------------------------------

def scale_records(n: int, seed: int = 0, scenes: int = SCALE_SCENES) -> Iterator[dict[str, str]]:
    """`n` raw records (the sample data's schema: id, dialogue, summary), each dialogue
    `scenes` scenes of scripts/make_sample_data.py long."""
    import random

    from scripts.make_sample_data import NAMES, SCENES

    rng = random.Random(seed)
    for i in range(n):
        a, b = rng.sample(NAMES, 2)
        parts = [rng.choice(SCENES)(rng, a, b) for _ in range(scenes)]
        yield {"id": f"s{i:07d}", "dialogue": "\n".join(d for d, _ in parts),
               "summary": " ".join(s for _, s in parts)}


def scale_rows(n: int, seed: int = 0, scenes: int = SCALE_SCENES) -> Iterator[dict[str, str]]:
    """`n` prepared rows (prepare's output schema): scale_records rendered by the shipped template."""
    from tasks.templates import render, resolve

    template = resolve("dialogue_summary", None)
    for record in scale_records(n, seed, scenes):
        prompt, completion = render(template, record, f"row {record['id']}")
        yield {"id": record["id"], "prompt": prompt, "completion": completion}


def on_disk(path: Path) -> None:
    """Writes `path` to disk and drops its pages from the page cache, so that the timed
    stage reads it from disk at every size: left as written, the 1M-row file was read from
    memory and the 10M-row one largely from disk."""
    with path.open("rb") as f:
        os.fsync(f.fileno())
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def scale_workspace(ws: Path, n: int) -> Path:
    """A folder tokenize runs in: ws's params and models, and `n` generated prepared rows,
    every tenth in validation."""
    out = Path(tempfile.mkdtemp(prefix=f"finetune-scale-{n}-"))
    try:
        shutil.copy2(ws / "params.yaml", out / "params.yaml")
        shutil.copytree(ws / "models", out / "models")
        prepared = out / "data" / "prepared"
        prepared.mkdir(parents=True)
        with (prepared / "train.jsonl").open("w") as train, (prepared / "validation.jsonl").open("w") as val:
            for i, row in enumerate(scale_rows(n)):
                (val if i % 10 == 9 else train).write(json.dumps(row) + "\n")
        for split in ("train", "validation"):
            on_disk(prepared / f"{split}.jsonl")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def prepare_workspace(ws: Path, n: int) -> Path:
    """A folder prepare runs in: ws's params.yaml and `n` generated raw records in the file
    it names (data/raw/dialogues.jsonl)."""
    from tasks.config import load_params

    out = Path(tempfile.mkdtemp(prefix=f"finetune-prepare-{n}-"))
    try:
        shutil.copy2(ws / "params.yaml", out / "params.yaml")
        raw = out / str(load_params(ws / "params.yaml").data.path)
        raw.parent.mkdir(parents=True)
        with raw.open("w") as f:
            for record in scale_records(n):
                f.write(json.dumps(record) + "\n")
        on_disk(raw)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def measured(cmd: list[str], cwd: Path, **extra_env: str) -> dict[str, float]:
    """Wall and CPU seconds and peak RSS of one child process (its own rusage, by wait4)."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env={**env(), **extra_env}, stdout=subprocess.DEVNULL,
                                stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{err.read().decode(errors='replace')[-3000:]}")
    return {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024)}


def scale_runs(folder: Path, stage: str, plain: list[str] | None, n: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """`finetune STAGE` and, given one and up to SCALE_BASELINE_MAX_ROWS rows, the `plain`
    script, each measured once in `folder` (removed after); with the stage's metrics."""
    try:
        runs = {"ours": measured(["finetune", stage], folder)}
        stats = json.loads((folder / "metrics" / f"{stage}.json").read_text())
        if plain is not None and n <= SCALE_BASELINE_MAX_ROWS:
            runs["baseline"] = measured(plain, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return runs, stats


def usage(runs: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {key: {k: r[key] for k, r in runs.items()} for key in ("peak_rss_mib", "wall_s", "cpu_s")}


def scale_series(ws: Path, sizes: tuple[int, ...], stage: str, plain: list[str],
                 workspace: Callable[[Path, int], Path], per: str) -> Iterator[tuple]:
    """`stage` and `plain` once per size, each in a workspace of that many rows: (rows, runs,
    stats, rows per `per` second of each side, ours' rate over its rate at the smallest size,
    the rate of each of ours' runs). The smallest size's `stage` runs REFERENCE_REPEATS times,
    each in a new workspace, and its median run is the reference: one run's rate varies by
    about 3%, as much as the differences between sizes that the ratio is read for."""
    smallest = None
    for n in sizes:
        repeats = []
        for repeat in range(1 if smallest else REFERENCE_REPEATS):
            runs, stats = scale_runs(workspace(ws, n), stage, None if repeat else plain, n)
            repeats.append((n / runs["ours"][per], runs, stats))
        ours, median_runs, stats = sorted(repeats, key=lambda r: r[0])[len(repeats) // 2]
        runs = {**repeats[0][1], "ours": median_runs["ours"]}  # the baseline ran with the first
        rate = {k: n / r[per] for k, r in runs.items()}
        smallest = smallest or ours
        yield n, runs, stats, rate, round(ours / smallest, 3), [round(r[0]) for r in repeats]


def bench_tokenize_scale(ws: Path, sizes: tuple[int, ...] = SCALE_ROWS) -> list[dict[str, Any]]:
    """`finetune tokenize` (streaming) on generated rows against bench/plain_tokenize.py,
    the former in-memory way, each run in its own process (scale_series: once a size, the
    smallest size's stage REFERENCE_REPEATS times)."""
    from tasks.config import load_params

    params = load_params(ws / "params.yaml")
    plain = [sys.executable, str(REPO / "bench" / "plain_tokenize.py"), "--model", params.model.name_or_path,
             "--max-length", str(params.tokenize.max_length)]
    results = []
    for n, runs, stats, rate, vs_smallest, rates in scale_series(ws, sizes, "tokenize", plain, scale_workspace,
                                                                 "wall_s"):
        results.append(report(
            "tokenize-scale", rate["ours"], rate.get("baseline"), "rows/s (wall, whole stage process)",
            rows=n, **usage(runs), ours_runs_rows_per_s=rates,
            rows_per_cpu_s={k: round(n / r["cpu_s"]) for k, r in runs.items()},  # steadier on a shared host
            rows_per_s_vs_smallest=vs_smallest,
            mean_tokens=stats["train"]["mean_tokens"], max_tokens=stats["train"]["max_tokens"],
            baseline_is=("bench/plain_tokenize.py: every row in Python lists, "
                         "Dataset.from_dict, save_to_disk" if "baseline" in runs
                         else f"not run above {SCALE_BASELINE_MAX_ROWS} rows (memory)")))
    return results


def bench_prepare_scale(ws: Path, sizes: tuple[int, ...] = SCALE_ROWS) -> list[dict[str, Any]]:
    """`finetune prepare` (streaming; leakage check on) on generated raw records against
    bench/plain_prepare.py, the former in-memory way, each run in its own process
    (scale_series: once a size, the smallest size's stage REFERENCE_REPEATS times)."""
    plain = [sys.executable, str(REPO / "bench" / "plain_prepare.py")]
    results = []
    for n, runs, stats, rate, vs_smallest, rates in scale_series(ws, sizes, "prepare", plain, prepare_workspace,
                                                                 "cpu_s"):
        results.append(report(
            "prepare-scale", rate["ours"], rate.get("baseline"), "rows per CPU second (whole stage process)",
            rows=n, **usage(runs), ours_runs_rows_per_cpu_s=rates, rows_per_cpu_s_vs_smallest=vs_smallest,
            rows_per_split=stats["rows_per_split"], leaked_rows=stats["leakage"]["rows"],
            baseline_is=("bench/plain_prepare.py: every row and the leakage index in memory"
                         if "baseline" in runs else f"not run above {SCALE_BASELINE_MAX_ROWS} rows (memory)")))
    return results


# ---- writing a large file ------------------------------------------------------------------

def _write_cpu_s(path: Path, open_file: Callable[[Path], Any]) -> float:
    """CPU seconds (user + kernel) to write WRITE_GIB GiB of prepared-row-sized lines to `path`
    (removed after)."""
    line = b"x" * (PREPARED_ROW_BYTES - 1) + b"\n"
    start = os.times()
    with open_file(path) as f:
        for _ in range((WRITE_GIB << 30) // len(line)):
            f.write(line)
    end = os.times()
    path.unlink()
    return end.user - start.user + end.system - start.system


def bench_streaming_write(ws: Path) -> dict[str, Any]:
    """tasks.io.StreamingWriter (prepare's split files) against a plain open("wb") writing the
    same lines, alternating, REPEATS times each; GiB per CPU second, medians."""
    from tasks.io import StreamingWriter

    runs: dict[str, list[float]] = {"ours": [], "baseline": []}
    with tempfile.TemporaryDirectory(dir=ws) as tmp:
        for _ in range(REPEATS):
            runs["baseline"].append(_write_cpu_s(Path(tmp) / "plain", lambda path: path.open("wb")))
            runs["ours"].append(_write_cpu_s(Path(tmp) / "ours", StreamingWriter))
    ours, baseline = (WRITE_GIB / statistics.median(runs[k]) for k in ("ours", "baseline"))
    return report("streaming-write", ours, baseline, "GiB written per CPU second (user + kernel)",
                  gib=WRITE_GIB, cpu_s={k: [round(t, 2) for t in v] for k, v in runs.items()},
                  baseline_is='a plain open("wb") and write() of the same lines')


# ---- evaluate ------------------------------------------------------------------------------

def bench_evaluate(ws: Path) -> dict[str, Any]:
    import torch

    from tasks import generation
    from tasks.config import load_params
    from tasks.io import read_jsonl
    from tasks.modeling import load_base, load_tokenizer

    cwd = os.getcwd()
    os.chdir(ws)
    try:
        params = load_params()
        tok = load_tokenizer(params.model, str(Workspace().tokenizer))
        model = load_base(params, quantized=params.quant.load_in_4bit).eval()
        prompts = [r["prompt"] for r in read_jsonl(Workspace().prepared / "test.jsonl")][:EVAL_PROMPTS]
        new_tokens = params.evaluate.max_new_tokens

        def ours(ps: list[str]) -> list[str]:
            return generation.generate(model, tok, ps, params)

        def per_example(ps: list[str]) -> list[str]:
            out = []
            with torch.inference_mode():
                for p in ps:
                    enc = tok(p, return_tensors="pt")
                    gen = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False,
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
                    out.append(tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
            return out

        def count(texts: list[str]) -> int:
            return sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)

        ours(prompts[:4]), per_example(prompts[:4])  # warm-up
        rates: dict[str, list[float]] = {"ours": [], "baseline": []}
        for _ in range(REPEATS):
            for impl, fn in (("ours", ours), ("baseline", per_example)):
                start = time.perf_counter()
                texts = fn(prompts)
                rates[impl].append(count(texts) / (time.perf_counter() - start))
    finally:
        os.chdir(cwd)
    med = {k: statistics.median(v) for k, v in rates.items()}
    return report("evaluate", med["ours"], med["baseline"], "generated tokens/s", prompts=len(prompts),
                  max_new_tokens=new_tokens, batch=params.evaluate.per_device_eval_batch_size,
                  repeats=REPEATS, baseline_is="model.generate one example at a time")


# ---- orchestration -------------------------------------------------------------------------

@contextlib.contextmanager
def prefect_server(home: Path):
    """A `prefect server` on loopback, as a deployment's runs have: started before the clock."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    proc = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env={**env(), "PREFECT_HOME": str(home)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(SERVER_START_TIMEOUT):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5)
                break
            except OSError:
                time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()


def bench_orchestration(ws: Path) -> list[dict[str, Any]]:
    from tasks.stages import STAGES

    stages = list(STAGES)
    flow = [sys.executable, "-c", "from flows.finetune import finetune; finetune(force=True)"]
    walls: dict[str, list[float]] = {"direct": [], "dvc": [], "prefect": [], "prefect-temporary-server": []}
    home = Path(tempfile.mkdtemp(prefix="prefect-home-"))
    with prefect_server(home) as url:
        # Untimed: a fresh server's first run also registers the flow and its tasks, which a
        # running server (the deployment's) has done long before.
        sh(flow, ws, PREFECT_API_URL=url, PREFECT_HOME=str(home))
        for _ in range(ORCHESTRATION_REPEATS):
            walls["direct"].append(sum(sh(["finetune", s], ws) for s in stages))
            walls["dvc"].append(sh(["dvc", "repro", "--force"], ws))
            walls["prefect"].append(sh(flow, ws, PREFECT_API_URL=url, PREFECT_HOME=str(home)))
            walls["prefect-temporary-server"].append(sh(flow, ws, PREFECT_HOME=str(home)))
    shutil.rmtree(home, ignore_errors=True)
    compute = statistics.median(walls["direct"])
    results = []
    for name, note in (("dvc", "dvc repro --force"),
                       ("prefect", "the finetune flow against a running prefect server"),
                       ("prefect-temporary-server", "the finetune flow with no PREFECT_API_URL: "
                        "Prefect starts a temporary local server inside the run")):
        wall = statistics.median(walls[name])
        results.append(report(f"orchestration-{name}", wall, compute,
                              "s (quickstart wall time vs the stages run directly)",
                              overhead_share=round((wall - compute) / wall, 4), stages=stages,
                              repeats=ORCHESTRATION_REPEATS, runs={k: [round(x, 1) for x in v]
                                                                   for k, v in walls.items()},
                              note=note))
    return results


BENCHES = {
    "train": bench_train,  # shipped params: padding_free auto (off with sdpa), random order
    "train-trl": bench_train_trl,  # the whole train stage against a plain TRL SFTTrainer script
    "train-padding_free": lambda ws: bench_train(ws, "train-padding_free", padding_free=True),
    "train-group_by_length": lambda ws: bench_train(ws, "train-group_by_length",
                                                    train_sampling_strategy="group_by_length"),
    "tokenize": bench_tokenize,
    "tokenize-scale": bench_tokenize_scale,  # 10k, 100k and 1M rows (--scale-rows): several minutes
    "prepare-scale": bench_prepare_scale,  # the same sizes of raw records through prepare
    "streaming-write": bench_streaming_write,  # prepare's split-file writer against plain writes, 5 GiB
    "evaluate": bench_evaluate,
    "orchestration": bench_orchestration,
}


SCALE_BENCHES = ("tokenize-scale", "prepare-scale")  # the ones --scale-rows sizes


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The benchmark names to run (all of them, in order, when none is named) and the
    tokenize-scale sizes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all): {', '.join(BENCHES)}")
    parser.add_argument("--scale-rows", type=int, nargs="+", default=list(SCALE_ROWS), metavar="N",
                        help="tokenize-scale, prepare-scale: generated rows per run (default: %(default)s)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    args.names = args.names or list(BENCHES)
    return args


def main() -> None:
    if sys.argv[1:2] == ["_train-ours"]:
        _train_ours(int(sys.argv[3]), sys.argv[4])
        return
    if sys.argv[1:2] == ["_stage-train"]:
        sys.exit(_stage_train(sys.argv[2:]))
    args = parse_args(sys.argv[1:])
    sys.path.insert(0, str(REPO))  # scripts/ (the sample data's generator) is not installed
    ws = workspace()
    try:
        for name in args.names:
            if name in SCALE_BENCHES:
                BENCHES[name](ws, tuple(args.scale_rows))
            else:
                BENCHES[name](ws)
    finally:
        shutil.rmtree(ws, ignore_errors=True)

if __name__ == "__main__":
    main()
