"""GPU benchmark (issue 5, item 3): the train stage's QLoRA path on a randomly initialised
Llama config against a plain TRL SFTTrainer script, side by side in one run, with MFU and peak memory
against the preflight estimate. No weights are downloaded: the config is built here.

    python bench/gpu.py --model llama-3.2-1b --seq 2048 --batch 4 --steps 30
    python bench/gpu.py --model llama-3.2-1b --mode lora-bf16     # LoRA on a bf16 base
    python bench/gpu.py --model tiny --steps 8                    # a CPU check of this script
    python bench/gpu.py --model llama-3.2-1b --profile 10:12      # + each side's top ops per step

Rows have random lengths between seq/4 and seq (as real data has), all tokens trainable;
tokens/s counts non-padding tokens after `--warmup` steps. "ours" is tasks.train.build_trainer
with the given params (padding per batch, or padding-free with flash_attention_2); the
baseline is SFTTrainer with TRL's defaults on the same model, LoRA, optimizer and rows. One
JSON line per implementation, then one with the ratio.

MFU = tokens/s x FLOPs per token / peak FLOP/s, where FLOPs per token = 4N (forward 2N plus
input-gradient backward 2N, the frozen base has no weight gradients; the adapter's are
negligible) + attention (6 L s d: causal QK^T and AV forward, twice that backward, at the
mean row length s), against both the H100's 989 TFLOP/s dense bf16 and a bf16 matmul peak
measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

H100_BF16_TFLOPS = 989.0
CONFIGS = {  # Llama 3.x shapes; only the architecture matters for speed and memory
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         tie_word_embeddings=True, max_position_embeddings=8192),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         tie_word_embeddings=False, max_position_embeddings=8192),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=1024, tie_word_embeddings=True,
                 max_position_embeddings=4096),
}
MATMUL_SIZE = 8192
MATMUL_REPEATS = 50


def measured_matmul_tflops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ a
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(MATMUL_REPEATS):
        a @ a
    torch.cuda.synchronize()
    return 2 * MATMUL_SIZE ** 3 * MATMUL_REPEATS / (time.perf_counter() - start) / 1e12


def workspace(args) -> Path:
    """A directory the train stage can run in: models/bench (random weights), the smoke
    tokenizer as data/tokenized/tokenizer, and random token rows as data/tokenized."""
    import datasets
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    ws = Path(tempfile.mkdtemp(prefix="finetune-gpu-bench-"))
    config = LlamaConfig(**CONFIGS[args.model], torch_dtype="bfloat16")
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(ws / "models/bench")
    del model
    tokenizer = AutoTokenizer.from_pretrained(REPO / "models/smoke-llama")
    tokenizer.save_pretrained(ws / "models/bench")
    tokenizer.save_pretrained(ws / "data/tokenized/tokenizer")
    rng = random.Random(0)
    rows = []
    for _ in range(args.batch * (args.steps + 1)):
        n = rng.randint(args.seq // 4, args.seq)
        ids = [rng.randrange(config.vocab_size) for _ in range(n)]
        rows.append({"input_ids": ids, "attention_mask": [1] * n, "labels": ids, "id": str(len(rows))})
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(ws / "data/tokenized")
    return ws


def params_for(args):
    import yaml

    from tasks.config import parse_params

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["model"].update(name_or_path="models/bench", attn_implementation=args.attn)
    raw["quant"]["load_in_4bit"] = args.mode == "qlora"
    raw["export"]["merge_into"] = "dequantized" if args.mode == "qlora" else "original"
    raw["tokenize"]["max_length"] = args.seq
    raw["evaluate"]["max_new_tokens"] = 16
    raw["train"].update(max_steps=args.steps, per_device_train_batch_size=args.batch,
                        save_steps=args.steps + 1, learning_rate=2e-4,
                        logging_steps=args.logging_steps or raw["train"]["logging_steps"],
                        padding_free=args.padding_free, gradient_checkpointing=args.checkpointing)
    return parse_params(raw, "bench params")


def timed(trainer, args) -> dict:
    from bench.run import StepTimer

    out = Path(tempfile.mkstemp(suffix=".json")[1])
    os.environ["BENCH_OUT"] = str(out)
    trainer.add_callback(StepTimer(args.warmup))
    ops: list[dict] = []
    totals: dict = {}
    if args.profile:
        trainer.add_callback(OpProfile(*args.profile, ops, totals))
    _reset_peak()
    trainer.train()
    result = json.loads(out.read_text())
    result["peak_gib"] = _peak_gib()
    if args.profile:
        result["profile_top"], result["profile_totals"] = ops, totals
    return result


PROFILE_TOP_OPS = 15


class OpProfile:
    """A TrainerCallback: torch.profiler over steps first..last-1, the ops with the most self
    time (on the GPU where there is one) per profiled step, into `out`."""

    def __new__(cls, first: int, last: int, out: list[dict], totals: dict):
        import torch
        import torch.profiler as tp
        from transformers import TrainerCallback

        cuda = torch.cuda.is_available()
        activities = [tp.ProfilerActivity.CPU] + ([tp.ProfilerActivity.CUDA] if cuda else [])

        class _Profile(TrainerCallback):
            profiler = None

            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == first:
                    if cuda:
                        torch.cuda.synchronize()
                    self.started = time.perf_counter()
                    self.profiler = tp.profile(activities=activities)
                    self.profiler.__enter__()

            def on_step_end(self, args, state, control, **kwargs):
                if self.profiler is None or state.global_step != last:
                    return
                if cuda:
                    torch.cuda.synchronize()
                wall = time.perf_counter() - self.started
                self.profiler.__exit__(None, None, None)
                key = "self_device_time_total" if cuda else "self_cpu_time_total"
                averages = self.profiler.key_averages()
                events = sorted(averages, key=lambda e: -getattr(e, key))
                steps = last - first
                out.extend({"op": e.key, "self_ms_per_step": round(getattr(e, key) / 1000 / steps, 3),
                            "calls_per_step": e.count // steps} for e in events[:PROFILE_TOP_OPS])
                # Whether a step waits on the host: its wall time beside the CPU and GPU time
                # of everything profiled (a step whose GPU time is well under its wall time is
                # launch- or host-bound).
                totals.update(
                    wall_ms_per_step=round(wall * 1000 / steps, 1),
                    cpu_ms_per_step=round(sum(e.self_cpu_time_total for e in averages) / 1000 / steps, 1),
                    gpu_ms_per_step=round(sum(e.self_device_time_total for e in averages) / 1000 / steps, 1)
                    if cuda else None)
                self.profiler = None

        return _Profile()


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def ours(args, params) -> dict:
    from tasks import train
    from tasks.workspace import Workspace

    trainer = train.build_trainer(params, Workspace(), [])
    if args.adapter_dtype == "bfloat16":  # what TRL's SFTTrainer does to the LoRA weights under QLoRA
        import torch

        for weight in trainer.model.parameters():
            if weight.requires_grad:
                weight.data = weight.data.to(torch.bfloat16)
    return timed(trainer, args)


def baseline(args, params) -> dict:
    """The plain TRL script: the same 4-bit (or bf16) model and LoRA settings handed to
    SFTTrainer with TRL's defaults (its collator pads each batch to its longest row)."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from tasks.modeling import load_tokenizer

    tok = load_tokenizer(params.model, "data/tokenized/tokenizer")
    data = datasets.load_from_disk("data/tokenized")["train"].select_columns(["input_ids"])
    cuda = torch.cuda.is_available()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16) if args.mode == "qlora" else None
    model = AutoModelForCausalLM.from_pretrained("models/bench", quantization_config=quant,
                                                 dtype=torch.bfloat16, attn_implementation=args.attn,
                                                 device_map={"": 0} if cuda else None)
    trainer = SFTTrainer(
        model=model, train_dataset=data, processing_class=tok,
        peft_config=LoraConfig(r=params.lora.r, lora_alpha=params.lora.lora_alpha,
                               lora_dropout=params.lora.lora_dropout, target_modules="all-linear",
                               task_type="CAUSAL_LM"),
        args=SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch,
                       max_steps=args.steps, learning_rate=2e-4, save_strategy="no", max_length=args.seq,
                       gradient_checkpointing=True, bf16=cuda, report_to="none",
                       optim="paged_adamw_8bit" if cuda else "adamw_torch",
                       include_num_input_tokens_seen="non_padding", use_cpu=not cuda,
                       logging_steps=args.logging_steps or args.steps, disable_tqdm=True))
    return timed(trainer, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(CONFIGS), default="llama-3.2-1b")
    parser.add_argument("--mode", choices=("qlora", "lora-bf16"), default="qlora")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "flash_attention_2", "eager"))
    parser.add_argument("--padding-free", default="auto", type=lambda v: v if v == "auto" else v == "true")
    parser.add_argument("--only", choices=("ours", "baseline"))
    parser.add_argument("--profile", metavar="A:B", type=lambda v: tuple(int(x) for x in v.split(":")),
                        help="torch.profiler over steps A..B-1: each line gets the top ops by self time")
    parser.add_argument("--adapter-dtype", choices=("as-trained", "bfloat16"), default="as-trained",
                        help="bfloat16: cast ours' trainable weights to bf16 first, as TRL does under QLoRA")
    parser.add_argument("--logging-steps", type=int,
                        help="both sides' logging_steps (default: ours params.yaml's, the baseline's --steps)")
    parser.add_argument("--checkpointing", default="auto", type=lambda v: v if v == "auto" else v == "true",
                        help="ours' train.gradient_checkpointing: auto (default), true or false")
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tasks.memory import estimate, with_checkpointing

    ws = workspace(args)
    os.chdir(ws)
    try:
        params = params_for(args)
        config = AutoConfig.from_pretrained("models/bench")
        # The estimate of the run train makes: train.gradient_checkpointing auto resolved as
        # train resolves it (the baseline always checkpoints, as the tutorials' script does).
        ours_checkpointing = with_checkpointing(params).train.gradient_checkpointing
        checkpointing = {"ours": ours_checkpointing, "baseline": True}
        est = {name: estimate(params.model_copy(update={"train": params.train.model_copy(
            update={"gradient_checkpointing": on})}), config, "bfloat16")["total"]
            for name, on in checkpointing.items()}
        peak = measured_matmul_tflops()
        results = {}
        for name, fn in (("ours", ours), ("baseline", baseline)):
            if args.only in (None, name):
                results[name] = fn(args, params)
        layers, hidden = config.num_hidden_layers, config.hidden_size
        with torch.device("meta"):
            n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        mean_len = (args.seq // 4 + args.seq) / 2
        flops_per_token = 4 * n + 6 * layers * mean_len * hidden
        for name, r in results.items():
            tps = r["tokens_per_s"]
            print(json.dumps({"name": f"gpu-train-{name}", "model": args.model, "mode": args.mode,
                              "seq": args.seq, "batch": args.batch, "steps": args.steps,
                              "tokens_per_s": round(tps, 1), "peak_gib": r["peak_gib"],
                              "estimate_gib": est[name], "peak_over_estimate": (round(r["peak_gib"] / est[name], 3)
                                                                          if r["peak_gib"] else None),
                              "mfu_vs_989": round(tps * flops_per_token / (H100_BF16_TFLOPS * 1e12), 4),
                              "mfu_vs_measured": round(tps * flops_per_token / (peak * 1e12), 4) if peak else None,
                              "measured_matmul_tflops": round(peak, 1) if peak else None,
                              "params": n, "attn": args.attn,
                              "gradient_checkpointing": checkpointing[name],
                              "padding_free": args.padding_free,
                              "logging_steps": args.logging_steps or (params.train.logging_steps if name == "ours" else args.steps),
                              "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
                              **({"profile_top": r["profile_top"], "profile_totals": r["profile_totals"]}
                                 if args.profile else {})}), flush=True)
        if len(results) == 2:
            print(json.dumps({"name": "gpu-train-ratio", "model": args.model, "attn": args.attn, "ratio": round(
                results["ours"]["tokens_per_s"] / results["baseline"]["tokens_per_s"], 3)}))
    finally:
        os.chdir(REPO)
        shutil.rmtree(ws, ignore_errors=True)


if __name__ == "__main__":
    main()
