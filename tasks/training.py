"""What the two training stages share (train's SFT and align's preference tuning: DPO, KTO,
ORPO or GRPO): the base made ready for adapter training, the optimizer this machine can run,
and the experiment trackers of train.report_to."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.config import Params
from tasks.errors import PipelineError
from tasks.modeling import HEAD_MODULES, device, load_base, match_vocab
from tasks.workspace import Workspace

log = logging.getLogger("finetune.training")

CPU_OPTIM = "adamw_torch_fused"  # bitsandbytes' paged/8-bit optimizers need CUDA
# torch's unfused AdamW takes its square roots through MKL's vector math, whose results depend
# on the CPU (AVX2 vs AVX-512) whatever MKL_CBWR says; the fused kernel is ATen's own, which
# model.cpu_math: portable holds to AVX2. The same update, so portable CPU runs use it.
PORTABLE_OPTIM = {"adamw_torch": "adamw_torch_fused"}
# MLflow's store when MLFLOW_TRACKING_URI is unset: a SQLite file (MLflow 3's local backend;
# run artifacts land beside it under mlruns/).
MLFLOW_DEFAULT_DIR = Path("mlruns")


def optim_name(params: Params) -> str:
    """train.optim as this machine runs it: paged and 8-bit optimizers need CUDA; on a CPU with
    model.cpu_math: portable, AdamW runs fused (the same bytes on every x86-64 CPU)."""
    name = params.train.optim
    if device() == "cuda":
        return name
    if "8bit" in name or "paged" in name:
        log.warning("train.optim %r needs CUDA; using %r on this CPU-only machine", name, CPU_OPTIM)
        return CPU_OPTIM
    if params.model.cpu_math == "portable" and name in PORTABLE_OPTIM:
        log.info("train.optim %r runs as %r (model.cpu_math: portable)", name, PORTABLE_OPTIM[name])
        return PORTABLE_OPTIM[name]
    return name


def run_name(stage: str) -> str:
    """One name per run for every tracker (a TensorBoard subfolder, an MLflow run name)."""
    from datetime import datetime, timezone

    return f"{stage}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


def trackers(params: Params, name: str, ws: Workspace) -> tuple[list[str], list[Any]]:
    """train.report_to split into what the Trainer's `report_to` takes as is and callbacks built
    here so each tracker writes under the workspace (ws.trackers) rather than into the checkpoint
    folder, which is removed after the run: (report_to, callbacks)."""
    import importlib.util
    import os

    from tasks.config import TRACKERS

    wanted = params.train.report_to
    for tracker in wanted:
        if importlib.util.find_spec(TRACKERS[tracker]) is None:
            raise PipelineError(f"train.report_to lists {tracker} but the {TRACKERS[tracker]} package "
                                f"is not installed (pip install {TRACKERS[tracker]})")
    callbacks: list[Any] = []
    # Only the first of train.num_processes writes: a writer per process would split the curve.
    first = os.environ.get("RANK", "0") == "0"
    if "tensorboard" in wanted and first:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(SummaryWriter(log_dir=str(ws.trackers / "tensorboard" / name))))
    if "dvclive" in wanted and first:
        from dvclive import Live
        from transformers.integrations import DVCLiveCallback  # dvclive's own is deprecated for it

        # dvcyaml=None: dvc.yaml stays the one definition of the graph; save_dvc_exp=False:
        # `dvc exp run` records the experiment itself, a stage must not make another.
        live = Live(dir=str(ws.trackers / "dvclive"), dvcyaml=None, save_dvc_exp=False)
        callbacks.append(DVCLiveCallback(live=live))
    if "mlflow" in wanted:
        import mlflow

        # Set every time: MLflow keeps the URI for the process, and its file store default
        # is refused by MLflow 3 (SQLite is the local backend it supports).
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            ws.path(MLFLOW_DEFAULT_DIR).mkdir(exist_ok=True)  # SQLite makes the file, not its folder
        mlflow.set_tracking_uri(uri or f"sqlite:///{ws.path(MLFLOW_DEFAULT_DIR)}/mlflow.db")
    return [t for t in wanted if t not in ("tensorboard", "dvclive")], callbacks


@contextmanager
def tracked(params: Params, args) -> Iterator[None]:
    """Holds one MLflow run open over training and the evaluation after it, so eval_loss lands
    in the training's run (MLflow's callback ends its own run at train end, and the next log
    call would open a second one)."""
    if "mlflow" not in params.train.report_to or args.process_index != 0:
        yield
        return
    import mlflow

    with mlflow.start_run(run_name=args.run_name):
        yield


def trainable_base(params: Params, tokenizer):
    """The base model made ready for adapter training (also what align starts from), or with
    full fine-tuning (peft.method none) for training every weight."""
    import torch

    quantized = params.quant.load_in_4bit
    # A full fine-tune's weights are float32 masters whatever train.precision: an optimizer
    # step is mostly far below bf16's resolution (8 bits of mantissa) and would be rounded
    # away; bf16/fp16 precision still runs the matmuls in half precision (autocast).
    full = params.peft.full_finetune
    model = load_base(params, quantized=quantized, torch_dtype=torch.float32 if full else None)
    # Training never reuses a KV cache, and with one the attention mask ignores the restarting
    # position ids that keep padding-free examples apart.
    model.config.use_cache = False
    match_vocab(model, tokenizer)
    if quantized:
        # What peft's prepare_model_for_kbit_training does, less its cast of every non-4-bit
        # weight to float32: with a bf16 base that cast made the embeddings and the LM head
        # float32, so the vocabulary-sized logits matmul ran in float32. On an H200 (Llama-3.2-1B
        # shape, 4 x 2048) train ran at 0.77x a plain TRL SFTTrainer, which does not cast, and
        # peaked at 37 GiB against its 4 GiB. Norms compute in float32 inside the layer anyway.
        for weight in model.parameters():
            weight.requires_grad = False
        if params.model.task == "sequence_classification":
            # The head starts random and is trained in full: its weights and their updates
            # stay float32 (bf16 autocast runs its matmul in bf16 all the same).
            for name, module in model.named_modules():
                if name.rpartition(".")[2] in HEAD_MODULES:
                    module.float()
    return model
