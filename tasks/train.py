"""train: QLoRA (4-bit NF4 base + LoRA adapters) or plain LoRA with PEFT and the
transformers Trainer.

The data is already tokenized and label-masked, so the plain Trainer with a dynamic-padding
collator is all that is needed (TRL's SFTTrainer would re-derive the same). Checkpoints go
to artifacts/checkpoints every `train.save_steps`; rerunning after an interruption resumes
from the last one when params and data are unchanged, and the checkpoints are removed once
the adapter is saved.

Reads data/tokenized/; writes artifacts/adapter/ (PEFT, safetensors, with the tokenizer),
metrics/train.json and metrics/train_log.tsv (loss, learning rate, tokens seen per step).

    finetune train
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

from tasks import paths
from tasks.config import Params
from tasks.errors import PipelineError
from tasks.io import atomic_path, normalize_adapter_config, save_tokenizer, sha256_path, write_json
from tasks.modeling import device, load_base, load_tokenizer, match_vocab, resolve_precision
from tasks.tokenize import IGNORE_INDEX

log = logging.getLogger("finetune.train")

FINGERPRINT = "fingerprint.txt"  # in CHECKPOINTS: what the checkpoints were trained from
CPU_OPTIM = "adamw_torch"  # bitsandbytes' paged/8-bit optimizers need CUDA


def _fingerprint(params: Params) -> str:
    import hashlib

    sections = {k: getattr(params, k).model_dump(mode="json")
                for k in ("model", "quant", "lora", "train")}
    payload = json.dumps(sections, sort_keys=True) + sha256_path(paths.TOKENIZED)
    return hashlib.sha256(payload.encode()).hexdigest()


def _resume_checkpoint(params: Params) -> str | None:
    """The last checkpoint of an interrupted run with the same inputs, else None (and a
    clean checkpoint directory)."""
    from transformers.trainer_utils import get_last_checkpoint

    marker = paths.CHECKPOINTS / FINGERPRINT
    fingerprint = _fingerprint(params)
    if marker.is_file() and marker.read_text() == fingerprint:
        # A kill while a checkpoint was being written leaves it without trainer_state.json,
        # which the Trainer writes last: drop such partial checkpoints.
        while (last := get_last_checkpoint(str(paths.CHECKPOINTS))) is not None:
            if (Path(last) / "trainer_state.json").is_file():
                log.info("resuming from %s", last)
                return last
            log.warning("removing incomplete checkpoint %s", last)
            shutil.rmtree(last)
    elif paths.CHECKPOINTS.exists():
        log.info("discarding checkpoints of a run with other params or data")
        shutil.rmtree(paths.CHECKPOINTS)
    paths.CHECKPOINTS.mkdir(parents=True, exist_ok=True)
    marker.write_text(fingerprint)
    return None


def _optim(name: str) -> str:
    if device() == "cuda" or not ("8bit" in name or "paged" in name):
        return name
    log.warning("train.optim %r needs CUDA; using %r on this CPU-only machine", name, CPU_OPTIM)
    return CPU_OPTIM


def _history_callback(history: list[dict[str, Any]]):
    from transformers import TrainerCallback

    class History(TrainerCallback):
        """Keeps the loss curve for dvc plots and stops on a non-finite loss."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            if not math.isfinite(logs["loss"]):
                raise PipelineError(f"training loss is {logs['loss']} at step {state.global_step}: "
                                    "lower train.learning_rate or check the data")
            history.append({"step": state.global_step, "loss": logs["loss"],
                            "learning_rate": logs.get("learning_rate"),
                            "tokens_seen": state.num_input_tokens_seen})

    return History()


def _model(params: Params, tokenizer):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    quantized = params.quant.load_in_4bit
    model = load_base(params, quantized=quantized)
    match_vocab(model, tokenizer)
    if quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=params.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **params.lora.model_dump()))
    return model


def _tf32(setting: str | bool) -> bool | None:
    import torch

    ampere = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
    if setting == "auto":
        return True if ampere else None  # None: leave torch's default (TF32 needs CUDA)
    if setting and not ampere:
        raise PipelineError("train.tf32 is true but this machine has no GPU with TF32 "
                            "(Ampere or newer): use auto")
    return setting


def training_arguments(params: Params, output_dir: str):
    from transformers import TrainingArguments

    t = params.train
    precision = resolve_precision(t.precision)
    fields = t.model_dump(exclude={"precision", "optim", "gradient_checkpointing", "tf32"})
    if t.use_liger_kernel:
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None:
            raise PipelineError("train.use_liger_kernel is true but the liger-kernel package is not "
                                "installed (pip install liger-kernel, on a CUDA machine)")
    return TrainingArguments(
        output_dir=output_dir, **fields, optim=_optim(t.optim),
        bf16=precision == "bf16", fp16=precision == "fp16", tf32=_tf32(t.tf32),
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        full_determinism=device() == "cpu",  # CUDA kernels would pay for it in speed
        data_seed=t.seed, save_strategy="steps", logging_strategy="steps",
        include_num_input_tokens_seen="non_padding", remove_unused_columns=False,
        use_cpu=device() == "cpu", report_to="none", disable_tqdm=False,
        logging_nan_inf_filter=False,  # the History callback must see a non-finite loss to stop
    )


def build_trainer(params: Params, output_dir: str, history: list[dict[str, Any]]):
    """The model, data and Trainer of the train stage (also what bench/ measures)."""
    import datasets
    from transformers import DataCollatorForSeq2Seq, Trainer, set_seed

    set_seed(params.train.seed)
    tokenizer = load_tokenizer(params.model, str(paths.TOKENIZER))
    data = datasets.load_from_disk(str(paths.TOKENIZED)).remove_columns("id")
    model = _model(params, tokenizer)
    return Trainer(
        model=model, args=training_arguments(params, output_dir),
        train_dataset=data["train"], eval_dataset=data.get("validation"),
        # Pads each batch to its own longest row, never to max_length.
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX,
                                             padding="longest"),
        processing_class=tokenizer, callbacks=[_history_callback(history)],
    )


def run(params: Params) -> dict[str, Any]:
    import torch

    from transformers import AutoConfig

    from tasks.memory import preflight
    from tasks.modeling import compute_dtype

    config = AutoConfig.from_pretrained(params.model.name_or_path, revision=params.model.revision,
                                        trust_remote_code=params.model.trust_remote_code)
    estimate = preflight(params, config, str(compute_dtype(params)).removeprefix("torch."), device())
    resume = _resume_checkpoint(params)
    history: list[dict[str, Any]] = []
    trainer = build_trainer(params, str(paths.CHECKPOINTS), history)
    model, tokenizer = trainer.model, trainer.processing_class
    trainable, total = model.get_nb_trainable_parameters()
    log.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / total)
    try:
        result = trainer.train(resume_from_checkpoint=resume)
        eval_loss = trainer.evaluate()["eval_loss"] if trainer.eval_dataset is not None else None
    except torch.cuda.OutOfMemoryError:
        raise PipelineError("CUDA out of memory: lower train.per_device_train_batch_size (raise "
                            "gradient_accumulation_steps to keep the effective batch), lower "
                            "tokenize.max_length, keep train.gradient_checkpointing: true, or use "
                            "quant.load_in_4bit: true") from None
    with atomic_path(paths.ADAPTER) as tmp:
        model.save_pretrained(tmp)
        normalize_adapter_config(tmp)
        save_tokenizer(tokenizer, tmp)
    metrics = {"train_loss": result.training_loss, "final_loss": history[-1]["loss"] if history else None,
               "eval_loss": eval_loss, "steps": result.global_step,
               "tokens_seen": trainer.state.num_input_tokens_seen,
               "trainable_params": trainable, "total_params": total,
               "estimated_peak_memory_gib": estimate["total"]}
    with atomic_path(paths.TRAIN_LOG) as tmp:
        rows = ["step\tloss\tlearning_rate\ttokens_seen"]
        rows += [f"{h['step']}\t{h['loss']}\t{h['learning_rate']}\t{h['tokens_seen']}" for h in history]
        tmp.write_text("\n".join(rows) + "\n")
    write_json(paths.METRICS["train"], metrics)
    shutil.rmtree(paths.CHECKPOINTS, ignore_errors=True)
    log.info("adapter saved to %s: %s", paths.ADAPTER, metrics)
    return metrics
