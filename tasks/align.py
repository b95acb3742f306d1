"""align: preference tuning (DPO, TRL's DPOTrainer) of the SFT adapter, the material's RL step.

Starts from artifacts/adapter on the same base the SFT stage trained on (4-bit with
quant.load_in_4bit). The reference policy is the SFT model itself: TRL keeps a frozen copy of
the adapter ("ref") on the one loaded base, so no second copy of the base weights is held.
The DPO loss pulls the chosen completion up and the rejected one down relative to that
reference, with align.beta weighting the implicit KL penalty. Prompts are rendered with the
same template as prepare; pairs whose id falls in the test or validation split (data.split)
are held out, and the reward accuracy and margins on them are reported.

Reads artifacts/adapter/ and align.path; writes artifacts/aligned/ (the DPO-tuned adapter)
and metrics/align.json. With align.enabled: false it only records that (artifacts/aligned/
holds a note) so the DAG is the same either way.

    finetune align
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Any

from tasks import templates
from tasks.config import SPLIT_NAMES, Params
from tasks.errors import DataError, PipelineError
from tasks.io import atomic_path, check_adapter, normalize_adapter_config, save_tokenizer, write_json
from tasks.records import BadRecord, read_file, split_of, to_example
from tasks.workspace import Workspace

log = logging.getLogger("finetune.align")

PAIR_FIELDS = ("chosen", "rejected")
DISABLED_NOTE = ("Preference tuning is off (align.enabled: false in params.yaml); the SFT "
                 "adapter is artifacts/adapter.\n")


def pairs(params: Params) -> dict[str, list[dict[str, str]]]:
    """{"train": [...], "held_out": [...]} of {id, prompt, chosen, rejected}, the prompt and
    both completions rendered through the prompt template."""
    path = Path(params.align.path)
    if not path.is_file():
        raise DataError(f"align.path: {path} does not exist")
    tpl = templates.resolve(params.prompt.template, params.prompt.completion)
    answer_fields = templates.fields_of(tpl.completion)
    id_column = params.data.id_column or "id"
    out: dict[str, list[dict[str, str]]] = {"train": [], "held_out": []}
    for where, record, bad in read_file(path, params.data):
        if bad is not None:
            raise DataError(f"{where}: {bad}")
        assert record is not None
        missing = [f for f in (id_column, *PAIR_FIELDS) if not record.get(f)]
        if missing:
            raise DataError(f"{where}: missing field {missing[0]!r} (preference records need "
                            f"an id, the template's input fields, chosen and rejected)")
        rendered = {}
        try:
            for field in PAIR_FIELDS:
                answer = {params.data.columns.get(f, f): record[field] for f in answer_fields}
                rendered[field] = to_example(params, tpl, None, where, {**record, **answer})
        except BadRecord as err:
            raise DataError(str(err)) from None
        row_id = str(record[id_column])
        # Held out by the hash alone: data.path's split files say nothing of preference pairs.
        split = "train" if split_of(row_id, params, set(SPLIT_NAMES)) == "train" else "held_out"
        out[split].append({"id": row_id, "prompt": rendered["chosen"]["prompt"],
                           "chosen": rendered["chosen"]["completion"],
                           "rejected": rendered["rejected"]["completion"]})
    for split, rows in out.items():
        if not rows:
            raise DataError(f"align.path: {path} has no {split} pairs (the split follows "
                            "data.split by id): add pairs")
    return out


def _trainer(params: Params, ws: Workspace, data: dict[str, list[dict[str, str]]], output_dir: str):
    import datasets
    from peft import PeftModel
    from trl import DPOConfig, DPOTrainer

    from tasks.memory import with_checkpointing
    from tasks.modeling import device, load_tokenizer, resolve_precision
    from tasks.training import optim_name, run_name, trackers, trainable_base

    params = with_checkpointing(params, estimated=False)
    a, t = params.align, params.train
    tokenizer = load_tokenizer(params.model, str(check_adapter(ws.adapter, "rerun `dvc repro train`")))
    model = PeftModel.from_pretrained(trainable_base(params, tokenizer), str(ws.adapter),
                                      is_trainable=True)
    precision = resolve_precision(t.precision)
    name = run_name("align")
    report_to, callbacks = trackers(params, name, ws)
    args = DPOConfig(
        output_dir=output_dir, beta=a.beta, max_steps=a.max_steps, learning_rate=a.learning_rate,
        per_device_train_batch_size=a.per_device_train_batch_size,
        per_device_eval_batch_size=a.per_device_eval_batch_size, max_length=params.tokenize.max_length,
        seed=a.seed, data_seed=a.seed, optim=optim_name(t.optim), lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps, max_grad_norm=t.max_grad_norm,
        bf16=precision == "bf16", fp16=precision == "fp16",
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        full_determinism=device() == "cpu", use_cpu=device() == "cpu", save_strategy="no",
        logging_steps=t.logging_steps, report_to=report_to or "none", run_name=name)
    return DPOTrainer(model=model, ref_model=None, args=args, processing_class=tokenizer,
                      callbacks=callbacks,
                      train_dataset=datasets.Dataset.from_list(data["train"]),
                      eval_dataset=datasets.Dataset.from_list(data["held_out"]))


def run(params: Params, ws: Workspace) -> dict[str, Any]:
    if not params.align.enabled:
        with atomic_path(ws.aligned) as tmp:
            tmp.mkdir()
            (tmp / "README.md").write_text(DISABLED_NOTE, encoding="utf-8")
        metrics: dict[str, Any] = {"enabled": False}
        write_json(ws.metrics("align"), metrics)
        log.info("align.enabled is false: nothing to do")
        return metrics
    data = pairs(params)
    log.info("DPO on %d preference pairs, %d held out", len(data["train"]), len(data["held_out"]))
    with tempfile.TemporaryDirectory() as scratch:
        trainer = _trainer(params, ws, data, scratch)
        from tasks.training import tracked

        with tracked(params, trainer.args):
            result = trainer.train()
            held_out = trainer.evaluate()
    loss = result.training_loss
    if math.isnan(loss):
        raise PipelineError("DPO loss is nan: lower align.learning_rate or align.beta")
    with atomic_path(ws.aligned) as tmp:
        trainer.model.save_pretrained(tmp, selected_adapters=["default"])
        normalize_adapter_config(tmp)
        save_tokenizer(trainer.processing_class, tmp)
    metrics = {"enabled": True, "train_loss": loss, "steps": result.global_step,
               "pairs": {k: len(v) for k, v in data.items()},
               "held_out": {k.removeprefix("eval_"): round(v, 6) for k, v in held_out.items()
                            if k.startswith(("eval_rewards/", "eval_logps/", "eval_loss"))}}
    write_json(ws.metrics("align"), metrics)
    log.info("aligned adapter saved to %s: %s", ws.aligned, metrics)
    return metrics
