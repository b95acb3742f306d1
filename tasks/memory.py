"""Resource preflights: from the model's shape and the params, estimates of the train
stage's peak memory (checked against the GPU's free memory, on a CPU against the host's
memory), of the disk train's checkpoints and export's merged model take (checked against the
output folder's filesystem), and of the host memory export's merge takes (checked against
MemAvailable). Each refuses before any work with one message naming the stage, the need,
what is free and the params that lower it. `finetune check` refuses, from config.json alone,
batch and sequence sizes no machine could hold (impossible_sizes).

The model is instantiated on PyTorch's meta device (no memory, no weights) to count every
linear layer's shape, so the estimates work for any architecture transformers can build.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tasks.config import Params
from tasks.errors import PipelineError

log = logging.getLogger("finetune.memory")

GIB = 1024**3
NF4_BYTES_PER_PARAM = 0.5  # 4 bits
# Quantization constants: one fp32 absmax per 64-weight block, or with double quantization
# 8 bits per block plus one fp32 per 256 blocks (the QLoRA paper's 0.127 bits/param).
QUANT_CONSTANT_BYTES = {False: 4 / 64, True: (1 + 4 / 256) / 64}
# Per trained parameter (an adapter's, or every one with full fine-tuning, whose weights train
# from float32 masters): fp32 weight + fp32 gradient + AdamW's two fp32 moments.
TRAINABLE_BYTES_PER_PARAM = 16
# Per token and per hidden unit, activations kept across layers under gradient
# checkpointing (the layer inputs), and inside the one layer being recomputed.
CHECKPOINTED_VALUES_PER_LAYER = 1
LIVE_LAYER_VALUES = 16
# Kept by every layer for the backward pass without checkpointing (QLoRA, bf16): measured on
# an H200 (BENCHMARKS.md, "GPU check"), Llama-3.2-1B 4 x 2048 peaked at 30.45 GiB and
# Llama-3.1-8B 2 x 2048 at 43.30 GiB; 34 puts both estimates within 1.15x of those.
STORED_LAYER_VALUES = 34
LOGITS_COPIES = 2  # the logits and their gradient (cross-entropy), in fp32
# train.fsdp: transformer blocks whose full weights a process holds at once, the one computing
# and the next, gathered ahead of it.
FSDP_GATHERED_BLOCKS = 2


def _dtype_bytes(name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[name]


@dataclass(frozen=True)
class Shape:
    """Parameter counts of a model and of what params train: the adapter's parameters, or
    with full fine-tuning (peft.method none) every parameter."""

    linear: int  # in the linear layers 4-bit quantization applies to (all but the output head)
    other: int  # embeddings, norms, the output head
    trainable: int
    has_head: bool  # an output head over the vocabulary (generative models)

    @property
    def total(self) -> int:
        return self.linear + self.other


def shape(params: Params, config: Any) -> Shape:
    import torch

    from tasks.modeling import model_class

    with torch.device("meta"):
        model = model_class(params.model.task).from_config(config)
    head = model.get_output_embeddings()
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    linear_params = sum(m.in_features * m.out_features for m in linear)
    total = sum(p.numel() for p in model.parameters())
    if params.peft.full_finetune:
        return Shape(linear=linear_params, other=total - linear_params, trainable=total, has_head=head is not None)
    targets = params.lora.target_modules
    adapted = [m for name, m in model.named_modules() if m in linear and (
        targets == "all-linear" or any(name.endswith(t) for t in ([targets] if isinstance(targets, str) else targets)))]
    return Shape(linear=linear_params,
                 other=total - linear_params,
                 trainable=sum(params.lora.r * (m.in_features + m.out_features) for m in adapted),
                 has_head=head is not None)


def estimate(params: Params, config: Any, compute_dtype: str, counts: Shape | None = None) -> dict[str, float]:
    """Peak memory of training, in GiB, by component."""
    counts = counts or shape(params, config)
    act = _dtype_bytes(compute_dtype)
    if params.peft.full_finetune:
        base = 0  # nothing is frozen: every weight is counted with its optimizer state below
    elif params.quant.load_in_4bit:
        per_param = NF4_BYTES_PER_PARAM + QUANT_CONSTANT_BYTES[params.quant.bnb_4bit_use_double_quant]
        base = counts.linear * per_param + counts.other * act
    else:
        base = counts.total * act
    tokens = params.train.per_device_train_batch_size * params.tokenize.max_length
    hidden, layers = config.hidden_size, config.num_hidden_layers
    kept = (CHECKPOINTED_VALUES_PER_LAYER if params.train.gradient_checkpointing else STORED_LAYER_VALUES) * layers
    activations = tokens * hidden * act * (kept + LIVE_LAYER_VALUES)
    # A classification head's logits are a few numbers per row, not one per vocabulary entry.
    logits = tokens * config.vocab_size * 4 * LOGITS_COPIES if counts.has_head else 0
    parts = {"base_weights": base, "trainable_and_optimizer": counts.trainable * TRAINABLE_BYTES_PER_PARAM,
             "activations": activations, "logits": logits}
    if params.train.fsdp:  # each process keeps its share, plus the blocks it has gathered whole
        shares = params.train.world_size
        parts["base_weights"] /= shares
        parts["trainable_and_optimizer"] /= shares
        parts["gathered_blocks"] = FSDP_GATHERED_BLOCKS * counts.linear / layers * act  # a block: its linear layers
    out = {k: round(v / GIB, 4) for k, v in parts.items()}
    out["total"] = round(sum(parts.values()) / GIB, 4)
    return out


def preflight(params: Params, config: Any, compute_dtype: str, device: str,
              checkpoints: Path) -> dict[str, float]:
    """Log the estimate; on a GPU, refuse to start when it exceeds the free memory. Refuse
    too when the checkpoints would not fit on the disk of `checkpoints`."""
    counts = shape(params, config)
    full = params.peft.full_finetune
    train_preflight(params, counts, checkpoints)
    est = estimate(params, config, compute_dtype, counts)
    log.info("estimated peak training memory: %.3f GiB (%s)", est["total"],
             ", ".join(f"{k} {v:.3f}" for k, v in est.items() if k != "total"))
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        check_fits(est["total"], free / GIB, full=full)
    elif (total := total_memory()) is not None:
        # On a CPU the processes share the host's memory; past MemTotal the run would only
        # swap until the kernel kills it.
        processes = params.train.num_processes
        check_fits(est["total"] * processes, total / GIB,
                   f"this host has {total / GIB:.1f} GiB of memory (MemTotal)"
                   + (f" for its {processes} training processes" if processes > 1 else ""), full)
    return est


def check_fits(needed_gib: float, free_gib: float, has: str | None = None, full: bool = False) -> None:
    if needed_gib > free_gib:
        has = has or f"the GPU has {free_gib:.1f} GiB free"
        raise PipelineError(f"training needs about {needed_gib:.1f} GiB but {has}: {lower_training_memory(full)}")


def lower_training_memory(full: bool) -> str:
    """What lowers train's memory, with full fine-tuning (`full`) or adapters."""
    return LOWER_FULL_FINETUNE_MEMORY if full else LOWER_TRAINING_MEMORY


LOWER_ACTIVATIONS = (
    "lower train.per_device_train_batch_size (raise gradient_accumulation_steps to keep the "
    "effective batch) or tokenize.max_length, keep train.gradient_checkpointing: true")
LOWER_TRAINING_MEMORY = f"{LOWER_ACTIVATIONS}, or use quant.load_in_4bit: true"
LOWER_FULL_FINETUNE_MEMORY = (f"{LOWER_ACTIVATIONS}, or train an adapter (peft.method lora, with "
                              "quant.load_in_4bit: true): full fine-tuning (peft.method none) holds "
                              "every weight with its gradient and optimizer state")
# Per training process, no machine holds more: eight of the largest accelerators sold today
# (H200, 141 GiB each), were one process to use them all. `finetune check` refuses sizes whose
# estimate is past this and past the host's memory: they are typos, not plans.
GPUS_PER_MACHINE, GPU_GIB = 8, 141
ANY_MACHINE_GIB = GPUS_PER_MACHINE * GPU_GIB
# config.json names of the sizes `estimate` reads, in the spellings architectures use.
CONFIG_SIZES = {"hidden_size": ("hidden_size", "d_model", "n_embd", "dim"),
                "num_hidden_layers": ("num_hidden_layers", "num_layers", "n_layer", "n_layers"),
                "vocab_size": ("vocab_size",)}


def config_sizes(model_dir: Path) -> SimpleNamespace | None:
    """hidden_size, num_hidden_layers and vocab_size from a local model's config.json,
    without transformers (`finetune check` loads no torch); None when it has no such file or
    does not give them (a damaged file is named by the model-file checks)."""
    path = model_dir / "config.json"
    try:
        # is_file first: opening a FIFO would block
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None
    found = {}
    for part in (config, config.get("text_config") if isinstance(config, dict) else None):
        if not isinstance(part, dict):
            continue
        for name, spellings in CONFIG_SIZES.items():
            value = next((part[s] for s in spellings if isinstance(part.get(s), int) and part[s] > 0), None)
            if value is not None:
                found.setdefault(name, value)
    return SimpleNamespace(**found) if len(found) == len(CONFIG_SIZES) else None


def impossible_sizes(params: Params) -> list[str]:
    """Problems for `finetune check`: the batch and sequence sizes whose activations and
    logits alone (no weights, 2-byte activations, checkpointing unless it is off: a lower
    bound of `estimate`) exceed any machine's memory and this host's. Needs the model's
    shape, so a local model only."""
    sizes = config_sizes(Path(params.model.name_or_path)) if params.model.is_local else None
    if sizes is None:
        return []
    no_weights = Shape(linear=0, other=0, trainable=0, has_head=params.model.task != "sequence_classification")
    need = estimate(params, sizes, "bfloat16", no_weights)["total"]
    host = (total_memory() or 0) / GIB
    if need <= max(ANY_MACHINE_GIB, host):
        return []
    t = params.train
    return [f"train.per_device_train_batch_size ({t.per_device_train_batch_size}) with tokenize.max_length "
            f"({params.tokenize.max_length}): training would need at least {need:,.0f} GiB per process "
            f"for activations and logits alone, more than any machine holds ({ANY_MACHINE_GIB} GiB: "
            f"{GPUS_PER_MACHINE} x {GPU_GIB} GiB) or this host ({host:.0f} GiB): lower them (raise "
            "train.gradient_accumulation_steps to keep the effective batch)"]


# Bytes per trained parameter on disk: the saved adapter's (or full fine-tune's) fp32 weights,
# and a checkpoint's fp32 weights plus AdamW's two fp32 moments (8-bit optimizers write less:
# this is the upper bound).
ADAPTER_FILE_BYTES_PER_PARAM = 4
CHECKPOINT_BYTES_PER_PARAM = 4 + 8
# The Trainer deletes the oldest checkpoint only after writing a new one.
EXTRA_CHECKPOINTS_AT_PEAK = 1
GGUF_BYTES_PER_PARAM = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32}  # q8_0: 32 int8 + an f16 scale
# Host copies of the merged weights while export saves them: on a CPU the model itself plus
# save_pretrained's serialized shard (up to 50 GB, so the whole model); on a GPU the shard only.
MERGE_HOST_COPIES = {"cpu": 2, "cuda": 1}
MEMINFO = Path("/proc/meminfo")


def checkpoint_disk(params: Params, counts: Shape) -> int:
    """Bytes train writes under artifacts/: its checkpoints at their peak, and the adapter (or
    the whole model, with full fine-tuning)."""
    kept = params.train.save_total_limit
    if params.train.eval_steps is not None:  # the best is kept besides the latest, even at a limit of 1
        kept = max(kept, 2)
    checkpoints = kept + EXTRA_CHECKPOINTS_AT_PEAK
    return counts.trainable * (checkpoints * CHECKPOINT_BYTES_PER_PARAM + ADAPTER_FILE_BYTES_PER_PARAM)


def merged_disk(params: Params, counts: Shape) -> int:
    """Bytes of export's merged model in export.torch_dtype (and its GGUF file, if asked)."""
    need = counts.total * _dtype_bytes(params.export.torch_dtype)
    if params.export.gguf:
        need += int(counts.total * GGUF_BYTES_PER_PARAM[params.export.gguf])
    return need


def _meminfo(field: str) -> int | None:
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024  # the file counts in KiB
    except OSError:
        pass
    return None


def available_memory() -> int | None:
    """MemAvailable: what the kernel can give without swapping; None off Linux."""
    return _meminfo("MemAvailable")


def total_memory() -> int | None:
    """MemTotal: the host's memory; None off Linux."""
    return _meminfo("MemTotal")


def size(n: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.0f} KiB"


def check_disk(stage: str, folder: Path, need: int, what: str, lower: str) -> None:
    from tasks.io import existing_ancestor

    free = shutil.disk_usage(existing_ancestor(folder)).free
    log.info("%s writes about %s to %s (%s); %s free there", stage, size(need), folder, what, size(free))
    if need > free:
        raise PipelineError(f"{stage}: {folder} needs about {size(need)} of disk ({what}) but its "
                            f"filesystem has {size(free)} free: free space there, or {lower}")


def check_memory(stage: str, need: int, what: str, lower: str) -> None:
    available = available_memory()
    if available is None:
        return
    log.info("%s needs about %s of host memory (%s); %s available", stage, size(need), what, size(available))
    if need > available:
        raise PipelineError(f"{stage}: {what} needs about {size(need)} of host memory but "
                            f"{size(available)} is available (MemAvailable): free memory, or {lower}")


def train_preflight(params: Params, counts: Shape, checkpoints: Path) -> None:
    limit = params.train.save_total_limit
    full = params.peft.full_finetune
    smaller = "use peft.method lora (full fine-tuning checkpoints every weight)" if full else "use a smaller lora.r"
    check_disk("train", checkpoints, checkpoint_disk(params, counts),
               f"{limit + EXTRA_CHECKPOINTS_AT_PEAK} checkpoints of {size(counts.trainable * CHECKPOINT_BYTES_PER_PARAM)} "
               f"at the peak, and the {'model' if full else 'adapter'}",
               f"lower train.save_total_limit (now {limit})" if limit > 1 else smaller)


def export_preflight(params: Params, counts: Shape, merged: Path, device: str) -> None:
    dtype = params.export.torch_dtype
    options = ["set export.torch_dtype: bfloat16 (half of float32)"] if dtype == "float32" else []
    if params.export.gguf not in (None, "q8_0"):
        options.append("set export.gguf: q8_0 (or null)")
    lower = " or ".join(options) or f"use a machine with more (export.torch_dtype is already {dtype})"
    check_disk("export", merged, merged_disk(params, counts), f"the merged model in {dtype}", lower)
    copies = MERGE_HOST_COPIES["cpu" if device == "cpu" else "cuda"]
    check_memory("export", copies * counts.total * _dtype_bytes(dtype),
                 f"merging the model in {dtype}", lower)


# train.gradient_checkpointing: auto checkpoints only when the run without it would need more
# than this share of the free memory. Checkpointing recomputes every layer's forward in the
# backward pass (here with its 4-bit dequantization and LoRA dropout draws): the CPU quickstart's
# train took 53 s with it and 43 s without, for a few MiB of activations (BENCHMARKS.md).
CHECKPOINTING_FREE_SHARE = 0.5


def with_checkpointing(params: Params, estimated: bool = True) -> Params:
    """params with train.gradient_checkpointing resolved to true or false. The recompute
    replays the same dropout draws, so the adapter is the same bytes either way. Without an
    estimate (align's preference tuning, whose memory the SFT estimate does not describe) auto
    means on."""
    setting = params.train.gradient_checkpointing
    if setting == "auto":
        setting = params.peft.method != "prefix_tuning" and (not estimated or _checkpointing_needed(params))
        log.info("train.gradient_checkpointing auto: %s", "on" if setting else "off (it would only cost time)")
    return params.model_copy(update={"train": params.train.model_copy(update={"gradient_checkpointing": setting})})


def _checkpointing_needed(params: Params) -> bool:
    from tasks.modeling import compute_dtype, device, load_config

    without = params.model_copy(update={"train": params.train.model_copy(update={"gradient_checkpointing": False})})
    need = estimate(without, load_config(params), str(compute_dtype(params)).removeprefix("torch."))["total"] * GIB
    if device() == "cuda":
        import torch

        free = torch.cuda.mem_get_info()[0]
    else:
        free = available_memory()
    return free is None or need > CHECKPOINTING_FREE_SHARE * free
