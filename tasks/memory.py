"""Memory preflight: an estimate of the train stage's peak accelerator memory, from the
model's shape and the params, printed before training and checked against the GPU.

The model is instantiated on PyTorch's meta device (no memory, no weights) to count every
linear layer's shape, so the estimate works for any architecture transformers can build.
"""

from __future__ import annotations

import logging
from typing import Any

from tasks.config import Params
from tasks.errors import PipelineError

log = logging.getLogger("finetune.memory")

GIB = 1024**3
NF4_BYTES_PER_PARAM = 0.5  # 4 bits
# Quantization constants: one fp32 absmax per 64-weight block, or with double quantization
# 8 bits per block plus one fp32 per 256 blocks (the QLoRA paper's 0.127 bits/param).
QUANT_CONSTANT_BYTES = {False: 4 / 64, True: (1 + 4 / 256) / 64}
ADAPTER_BYTES_PER_PARAM = 16  # fp32 weight + fp32 gradient + AdamW's two fp32 moments
# Per token and per hidden unit, activations kept across layers under gradient
# checkpointing (the layer inputs), and inside the one layer being recomputed.
CHECKPOINTED_VALUES_PER_LAYER = 1
LIVE_LAYER_VALUES = 16
LOGITS_COPIES = 2  # the logits and their gradient (cross-entropy), in fp32


def _dtype_bytes(name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[name]


def estimate(params: Params, config: Any, compute_dtype: str) -> dict[str, float]:
    """Peak memory of training, in GiB, by component."""
    import torch

    from tasks.modeling import model_class

    with torch.device("meta"):
        model = model_class(params.model.task).from_config(config)
    head = model.get_output_embeddings()
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    linear_params = sum(m.in_features * m.out_features for m in linear)
    other_params = sum(p.numel() for p in model.parameters()) - linear_params
    act = _dtype_bytes(compute_dtype)
    if params.quant.load_in_4bit:
        per_param = NF4_BYTES_PER_PARAM + QUANT_CONSTANT_BYTES[params.quant.bnb_4bit_use_double_quant]
        base = linear_params * per_param + other_params * act
    else:
        base = (linear_params + other_params) * act
    targets = params.lora.target_modules
    adapted = [m for name, m in model.named_modules() if m in linear and (
        targets == "all-linear" or any(name.endswith(t) for t in ([targets] if isinstance(targets, str) else targets)))]
    adapter_params = sum(params.lora.r * (m.in_features + m.out_features) for m in adapted)
    tokens = params.train.per_device_train_batch_size * params.tokenize.max_length
    hidden, layers = config.hidden_size, config.num_hidden_layers
    kept = CHECKPOINTED_VALUES_PER_LAYER * layers if params.train.gradient_checkpointing else LIVE_LAYER_VALUES * layers
    activations = tokens * hidden * act * (kept + LIVE_LAYER_VALUES)
    # A classification head's logits are a few numbers per row, not one per vocabulary entry.
    logits = tokens * config.vocab_size * 4 * LOGITS_COPIES if head is not None else 0
    parts = {"base_weights": base, "adapter_and_optimizer": adapter_params * ADAPTER_BYTES_PER_PARAM,
             "activations": activations, "logits": logits}
    out = {k: round(v / GIB, 4) for k, v in parts.items()}
    out["total"] = round(sum(parts.values()) / GIB, 4)
    return out


def preflight(params: Params, config: Any, compute_dtype: str, device: str) -> dict[str, float]:
    """Log the estimate; on a GPU, refuse to start when it exceeds the free memory."""
    est = estimate(params, config, compute_dtype)
    log.info("estimated peak training memory: %.3f GiB (%s)", est["total"],
             ", ".join(f"{k} {v:.3f}" for k, v in est.items() if k != "total"))
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        check_fits(est["total"], free / GIB)
    return est


def check_fits(needed_gib: float, free_gib: float) -> None:
    if needed_gib > free_gib:
        raise PipelineError(
            f"training needs about {needed_gib:.1f} GiB but the GPU has {free_gib:.1f} GiB free: "
            "lower train.per_device_train_batch_size (raise gradient_accumulation_steps to keep the "
            "effective batch) or tokenize.max_length, keep train.gradient_checkpointing: true, or "
            "use quant.load_in_4bit: true")
