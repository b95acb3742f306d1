"""Where a training step's time goes: the train stage against the plain TRL script, by phase.

Runs `finetune train` (ours) or bench/trl_train.py (trl) in this process with a hook on
transformers' Trainer that times each phase of every optimizer step (wall and process CPU
seconds): fetching and collating the batch, forward + loss, backward, gradient clipping and
norm, the optimizer step, the scheduler/zero_grad/token counting rest, logging + callbacks,
checkpoints. Nothing in tasks/ or the TRL script is changed; the hook wraps the Trainer's
own methods after it is built, so it measures whatever code is checked out.

    python bench/profile_train.py ours --steps 30            # in a prepared, tokenized workspace
    python bench/profile_train.py trl --steps 30
    python bench/profile_train.py ours --steps 30 --torch-profile 10:20   # + op table of steps 10-19
    python bench/profile_train.py ours --cprofile prof.out    # + cProfile of the whole process

Prints one JSON line: per phase the total and per-step wall/CPU milliseconds over the steps
after --warmup, the steps' median wall time, train_runtime and tokens/s.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

WARMUP = 5


class Phases:
    """Wall and CPU seconds per phase name, counted only after the warm-up steps."""

    def __init__(self, warmup: int):
        self.warmup, self.step = warmup, 0
        self.counting = False  # from the start of step warmup + 1 to the end of training
        self.wall: dict[str, float] = collections.defaultdict(float)
        self.cpu: dict[str, float] = collections.defaultdict(float)
        self.stack: list[list[float]] = []
        self.step_marks: list[tuple[float, float, int]] = []
        self.runtime = None
        self.tokens = 0

    @contextlib.contextmanager
    def timed(self, name: str):
        # Nested phases (a callback inside logging) are charged to the innermost one only:
        # each frame is [wall of its children, CPU of its children].
        w0, c0 = time.perf_counter(), time.process_time()
        frame = [0.0, 0.0]
        self.stack.append(frame)
        try:
            yield
        finally:
            self.stack.pop()
            dw, dc = time.perf_counter() - w0, time.process_time() - c0
            if self.counting:
                self.wall[name] += dw - frame[0]
                self.cpu[name] += dc - frame[1]
            if self.stack:
                self.stack[-1][0] += dw
                self.stack[-1][1] += dc


def wrap(obj, attr: str, phases: Phases, name: str) -> None:
    original = getattr(obj, attr)

    @functools.wraps(original)
    def timed(*args, **kwargs):
        with phases.timed(name):
            return original(*args, **kwargs)

    setattr(obj, attr, timed)


def install(phases: Phases, steps: int | None, torch_profile: tuple[int, int] | None, prof_out: dict,
            fill: bool = True, deterministic: bool = True, ab: str | None = None) -> None:
    """Patches transformers.Trainer.__init__ so every Trainer built afterwards is timed."""
    import transformers
    from transformers import TrainerCallback

    class StepMarks(TrainerCallback):
        def __init__(self):
            self.profiler = None
            self.pre_opt = None

        def on_step_begin(self, args, state, control, **kwargs):
            if ab:  # odd steps run variant B: an A/B inside one run, under the same load
                import torch

                b = state.global_step % 2 == 1
                if ab == "fill":
                    torch.utils.deterministic.fill_uninitialized_memory = not b
                elif ab == "deterministic":
                    torch.use_deterministic_algorithms(not b)
                elif ab == "mkl_dynamic":  # B: MKL picks its thread count per call (its default)
                    import ctypes

                    lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
                    lib.MKL_Set_Dynamic(ctypes.c_int(int(b)))
            if state.global_step == phases.warmup:
                phases.counting = True
            phases.step_marks.append((time.perf_counter(), time.process_time(), state.num_input_tokens_seen))
            if torch_profile and state.global_step == torch_profile[0]:
                import torch.profiler as tp

                self.profiler = tp.profile(activities=[tp.ProfilerActivity.CPU], record_shapes=False)
                self.profiler.__enter__()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.pre_opt = (time.perf_counter(), time.process_time())

        def on_optimizer_step(self, args, state, control, **kwargs):
            if self.pre_opt and phases.counting:
                phases.wall["optimizer.step"] += time.perf_counter() - self.pre_opt[0]
                phases.cpu["optimizer.step"] += time.process_time() - self.pre_opt[1]

        def on_step_end(self, args, state, control, **kwargs):
            if self.profiler is not None and state.global_step == torch_profile[1]:
                self.profiler.__exit__(None, None, None)
                prof_out["table"] = self.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
                self.profiler = None

        def on_train_end(self, args, state, control, **kwargs):
            phases.step_marks.append((time.perf_counter(), time.process_time(), state.num_input_tokens_seen))
            phases.counting = False

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "train_runtime" in logs:
                phases.runtime = logs["train_runtime"]
                phases.tokens = state.num_input_tokens_seen

    original_init = transformers.Trainer.__init__

    @functools.wraps(original_init)
    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if steps:
            self.args.max_steps = steps
        import torch

        if not deterministic:  # what full_determinism turned on in __init__, off again
            torch.use_deterministic_algorithms(False)
        if not fill:  # deterministic algorithms, without NaN-filling every new tensor
            torch.utils.deterministic.fill_uninitialized_memory = False
        prof_out["trainer"] = self
        wrap(self, "get_batch_samples", phases, "data: fetch + collate")
        wrap(self, "compute_loss", phases, "forward + loss")
        wrap(self.accelerator, "backward", phases, "backward")
        wrap(self, "_clip_grad_norm", phases, "clip grad norm")
        wrap(self, "_get_grad_norm", phases, "grad norm (item)")
        wrap(self, "_track_num_input_tokens", phases, "count tokens")
        wrap(self, "floating_point_ops", phases, "count flops")
        wrap(self, "_maybe_log_save_evaluate", phases, "log/save/eval (trainer)")
        wrap(self, "_save_checkpoint", phases, "checkpoint save")
        wrap(self, "training_step", phases, "training_step (rest)")
        handler = self.callback_handler
        original_event = handler.call_event

        def call_event(event, args, state, control, **kw):
            with phases.timed(f"callbacks: {event}"):
                return original_event(event, args, state, control, **kw)

        handler.call_event = call_event
        self.add_callback(StepMarks())

    transformers.Trainer.__init__ = init


def identity(trainer) -> dict:
    """What the run computed, to tell a faster run from a different one: every logged loss
    and a hash of the trained (adapter) weights."""
    import hashlib

    if trainer is None:
        return {}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    digest = hashlib.sha256()
    for name, p in sorted(trainer.model.named_parameters()):
        if p.requires_grad:
            digest.update(name.encode() + p.detach().float().cpu().numpy().tobytes())
    return {"losses": losses, "adapter_sha256": digest.hexdigest()[:16]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("impl", choices=["ours", "trl"])
    parser.add_argument("--steps", type=int, help="stop after this many optimizer steps (default: params.yaml's)")
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--torch-profile", metavar="A:B", help="torch.profiler op table over steps A..B-1")
    parser.add_argument("--cprofile", metavar="FILE", help="also write a cProfile of the whole run")
    parser.add_argument("--out", help="also write the JSON result to this file")
    parser.add_argument("--no-fill", action="store_true",
                        help="experiment: torch.utils.deterministic.fill_uninitialized_memory = False")
    parser.add_argument("--no-deterministic", action="store_true",
                        help="experiment: torch.use_deterministic_algorithms(False) after the Trainer is built")
    parser.add_argument("--trl-args", default="", help="extra arguments for bench/trl_train.py")
    parser.add_argument("--ab", choices=["fill", "deterministic", "mkl_dynamic"],
                        help="experiment: even steps as configured (A), odd steps with the fill (or the "
                             "deterministic algorithms) off (B); reports B/A per token")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ as a package
    phases, prof_out = Phases(args.warmup), {}
    torch_profile = tuple(int(x) for x in args.torch_profile.split(":")) if args.torch_profile else None
    install(phases, args.steps, torch_profile, prof_out, fill=not args.no_fill,
            deterministic=not args.no_deterministic, ab=args.ab)
    if args.impl == "ours":
        from tasks.cli import main as cli

        run = functools.partial(cli, ["train"])
    else:
        from bench import trl_train

        sys.argv = ["bench/trl_train.py", "--no-save", *args.trl_args.split()]
        run = trl_train.main
    if args.cprofile:
        import cProfile

        cProfile.runctx("run()", globals(), {"run": run}, args.cprofile)
    else:
        run()

    # step_marks: the start of every step, then the end of training (after the last step's
    # logging and checkpoint): intervals from the start of step warmup + 1.
    marks = phases.step_marks[args.warmup:]
    n = max(len(marks) - 1, 1)
    step_wall = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    step_cpu = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
    total_wall = marks[-1][0] - marks[0][0]
    total_cpu = marks[-1][1] - marks[0][1]
    named_w = sum(v for k, v in phases.wall.items() if not k.startswith("_"))
    named_c = sum(v for k, v in phases.cpu.items() if not k.startswith("_"))
    table = {k: {"wall_ms_per_step": round(1000 * phases.wall[k] / n, 2),
                 "cpu_ms_per_step": round(1000 * phases.cpu[k] / n, 2)}
             for k in sorted(phases.wall, key=lambda k: -phases.wall[k]) if not k.startswith("_")}
    table["other (loop, scheduler, zero_grad)"] = {
        "wall_ms_per_step": round(1000 * (total_wall - named_w) / n, 2),
        "cpu_ms_per_step": round(1000 * (total_cpu - named_c) / n, 2)}
    result = {"impl": args.impl, "steps_timed": n, "warmup": args.warmup,
              "step_wall_ms": {"median": round(1000 * statistics.median(step_wall), 1),
                               "min": round(1000 * min(step_wall), 1), "mean": round(1000 * total_wall / n, 1)},
              "step_cpu_ms": {"median": round(1000 * statistics.median(step_cpu), 1),
                              "mean": round(1000 * total_cpu / n, 1)},
              "step_wall_ms_each": [round(1000 * x, 2) for x in step_wall],
              "step_cpu_ms_each": [round(1000 * x, 2) for x in step_cpu],
              "tokens_per_s_after_warmup": round((marks[-1][2] - marks[0][2]) / total_wall, 1),
              "tokens_per_cpu_s_after_warmup": round((marks[-1][2] - marks[0][2]) / total_cpu, 1),
              "train_runtime": phases.runtime, "tokens_seen": phases.tokens,
              "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
              "load_avg": os.getloadavg(), "phases": table, **identity(prof_out.get("trainer"))}
    if args.ab:
        # marks[i] starts step warmup + 1 + i (global_step warmup + i before it): B when that is odd.
        per_token = {"A": [], "B": []}
        for i, (a, b) in enumerate(zip(marks, marks[1:])):
            side = "B" if (args.warmup + i) % 2 == 1 else "A"
            per_token[side].append(((b[1] - a[1]) / (b[2] - a[2]), (b[0] - a[0]) / (b[2] - a[2])))
        med = {k: [statistics.median(x[j] for x in v) for j in (0, 1)] for k, v in per_token.items()}
        result["ab"] = {"variant": args.ab, "steps": {k: len(v) for k, v in per_token.items()},
                        "cpu_us_per_token": {k: round(1e6 * v[0], 2) for k, v in med.items()},
                        "wall_us_per_token": {k: round(1e6 * v[1], 2) for k, v in med.items()},
                        "cpu_B_over_A": round(med["B"][0] / med["A"][0], 4),
                        "wall_B_over_A": round(med["B"][1] / med["A"][1], 4)}
    print(json.dumps(result), flush=True)
    if "table" in prof_out:
        print(prof_out["table"], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + ("\n" + prof_out["table"] if "table" in prof_out else ""))


if __name__ == "__main__":
    main()
