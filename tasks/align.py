"""align: preference tuning of the SFT adapter with TRL, the material's RL step: DPO, KTO,
ORPO or GRPO (align.method).

Starts from artifacts/adapter on the same base the SFT stage trained on (4-bit with
quant.load_in_4bit). DPO and KTO measure the policy against a reference, the SFT model itself:
TRL keeps a frozen copy of the adapter ("ref") on the one loaded base, so no second copy of the
base weights is held. DPO pulls the chosen completion up and the rejected one down relative to
that reference; KTO scores single completions, each desirable or not, against it; ORPO needs no
reference (the chosen completion's loss plus an odds-ratio penalty, weighted by align.beta).
Prompts are rendered with the same template as prepare; records whose id falls in the test or
validation split (data.split) are held out, and the method's reward metrics on them are
reported. GRPO reads no preference records: it samples align.num_generations answers to each
prompt of prepare's train split, scores them with align.rewards (tasks/rewards.py) against the
row's references, and moves the policy towards the answers that beat their group's mean; the
greedy answers of the SFT and the aligned model to the validation prompts are scored the same
way.

Reads artifacts/adapter/ and align.path (data/prepared/ for grpo); writes artifacts/aligned/ (the tuned adapter) and
metrics/align.json. With align.enabled: false it only records that (artifacts/aligned/ holds a
note) so the DAG is the same either way.

    finetune align
"""

from __future__ import annotations

import importlib
import logging
import math
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks import templates
from tasks.config import SPLIT_NAMES, Params
from tasks.errors import DataError, PipelineError
from tasks.io import atomic_path, check_adapter, normalize_adapter_config, read_jsonl, save_tokenizer, write_json
from tasks.records import BadRecord, read_file, split_of, to_example
from tasks.workspace import Workspace

log = logging.getLogger("finetune.align")

PAIR_FIELDS = ("chosen", "rejected")
UNPAIRED_FIELDS = ("completion", "label")  # kto's own rows: one completion, desirable or not
DISABLED_NOTE = ("Preference tuning is off (align.enabled: false in params.yaml); the SFT "
                 "adapter is artifacts/adapter.\n")
# align.method: (module, config class, trainer class). ORPO is in trl.experimental in TRL 1.16.
TRAINERS = {"dpo": ("trl", "DPOConfig", "DPOTrainer"),
            "kto": ("trl", "KTOConfig", "KTOTrainer"),
            "orpo": ("trl.experimental.orpo", "ORPOConfig", "ORPOTrainer"),
            "grpo": ("trl", "GRPOConfig", "GRPOTrainer")}
# What each method learns from, as metrics/align.json counts it.
COUNTED = {"dpo": "pairs", "orpo": "pairs", "kto": "rows", "grpo": "prompts"}  # kto: a pair is two rows
# GRPO's prompts: prepare's splits (the validation one scores SFT against aligned).
PROMPT_SPLITS = {"train": "train.jsonl", "held_out": "validation.jsonl"}
# The methods that train against the SFT model as reference (TRL's "ref" adapter).
WITH_REFERENCE = ("dpo", "kto")
# The held-out metrics each method's trainer logs (eval_ prefix removed) that align.json keeps.
HELD_OUT = {"dpo": ("rewards/", "logps/", "loss"),
            "kto": ("rewards/", "logps/", "loss", "kl"),
            "orpo": ("rewards/", "logps/", "loss", "nll_loss", "log_odds")}
Row = dict[str, Any]


def _records(params: Params, rows_of: Callable[[str, dict[str, Any], Callable[[str], Row]], list[Row]]
             ) -> dict[str, list[Row]]:
    """{"train": [...], "held_out": [...]}: align.path's records, each turned into rows by
    `rows_of(where, record, render)`, where render(text) is the record's {prompt, completion}
    with `text` as its answer, rendered through the prompt template."""
    path = Path(params.align.path)
    if not path.is_file():
        raise DataError(f"align.path: {path} does not exist")
    tpl = templates.resolve(params.prompt.template, params.prompt.completion)
    answer_fields = templates.fields_of(tpl.completion)
    id_column = params.data.id_column or "id"
    out: dict[str, list[Row]] = {"train": [], "held_out": []}
    for where, record, bad in read_file(path, params.data):
        if bad is not None:
            raise DataError(f"{where}: {bad}")
        assert record is not None
        if _absent(record, id_column):
            raise DataError(f"{where}: missing field {id_column!r} (the id column, which decides "
                            "the held-out split)")

        def render(text: str) -> Row:  # called by rows_of below, within this record's iteration
            answer = {params.data.columns.get(f, f): text for f in answer_fields}
            try:
                return to_example(params, tpl, None, where, {**record, **answer})
            except BadRecord as err:
                raise DataError(str(err)) from None

        row_id = str(record[id_column])
        # Held out by the hash alone: data.path's split files say nothing of preference records.
        split = "train" if split_of(row_id, params, set(SPLIT_NAMES)) == "train" else "held_out"
        out[split] += [{"id": row_id, **row} for row in rows_of(where, record, render)]
    for split, rows in out.items():
        if not rows:
            raise DataError(f"align.path: {path} has no {split} records (the split follows "
                            "data.split by id): add records")
    return out


def _absent(record: dict[str, Any], field: str) -> bool:
    return record.get(field) is None or record.get(field) == ""


def _require(where: str, record: dict[str, Any], fields: tuple[str, ...], needs: str) -> None:
    missing = [f for f in fields if _absent(record, f)]
    if missing:
        raise DataError(f"{where}: missing field {missing[0]!r} ({needs})")


def _pair(where: str, record: dict[str, Any], render: Callable[[str], Row]) -> Row:
    _require(where, record, PAIR_FIELDS, "preference records need an id, the template's input "
             "fields, chosen and rejected")
    chosen, rejected = render(record["chosen"]), render(record["rejected"])
    return {"prompt": chosen["prompt"], "chosen": chosen["completion"], "rejected": rejected["completion"]}


def pairs(params: Params) -> dict[str, list[Row]]:
    """{"train": [...], "held_out": [...]} of {id, prompt, chosen, rejected}, the prompt and
    both completions rendered through the prompt template (dpo and orpo)."""
    return _records(params, lambda where, record, render: [_pair(where, record, render)])


def _unpaired(where: str, record: dict[str, Any], render: Callable[[str], Row]) -> list[Row]:
    if "label" not in record:
        # A preference pair: its chosen completion is desirable, its rejected one is not.
        pair = _pair(where, record, render)
        return [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
                {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}]
    _require(where, record, UNPAIRED_FIELDS, "kto records need an id, the template's input "
             "fields, and a completion with a boolean label, or chosen and rejected")
    if not isinstance(record["label"], bool):
        raise DataError(f"{where}: field 'label' must be true (desirable) or false (undesirable), "
                        f"not {record['label']!r}")
    row = render(record["completion"])
    return [{"prompt": row["prompt"], "completion": row["completion"], "label": record["label"]}]


def unpaired(params: Params) -> dict[str, list[Row]]:
    """{"train": [...], "held_out": [...]} of {id, prompt, completion, label} (kto): a record
    with a label is one row; a pair (no label) is two, chosen desirable and rejected not."""
    out = _records(params, _unpaired)
    # KTO reads its rows in order and estimates the KL term from each row's neighbour in the
    # batch; a pair's two rows side by side would pair a prompt with its own completion.
    for rows in out.values():
        random.Random(params.align.seed).shuffle(rows)
    return out


def prompts(params: Params, ws: Workspace) -> dict[str, list[Row]]:
    """{"train": [...], "held_out": [...]} of {id, prompt, references} (grpo): prepare's train
    and validation rows, each with its references (data.references) or its completion."""
    out: dict[str, list[Row]] = {}
    for split, name in PROMPT_SPLITS.items():
        rows = read_jsonl(ws.prepared / name, required={"id": object, "prompt": str, "completion": str},
                          recover="rerun `dvc repro prepare`")
        if not rows:
            raise DataError(f"{ws.prepared / name} has no rows: GRPO trains on the train split and "
                            "scores the validation split (data.split.validation_size must be above 0)")
        out[split] = [{"id": str(r["id"]), "prompt": r["prompt"],
                       "references": [t.strip() for t in r.get("references") or [r["completion"]]]}
                      for r in rows]
    return out


def _trainer(params: Params, ws: Workspace, data: dict[str, list[Row]], output_dir: str):
    import datasets
    from peft import PeftModel

    from tasks.memory import with_checkpointing
    from tasks.modeling import device, load_tokenizer, resolve_precision
    from tasks.training import optim_name, run_name, trackers, trainable_base

    params = with_checkpointing(params, estimated=False)
    a, t = params.align, params.train
    module, config_class, trainer_class = TRAINERS[a.method]
    trl = importlib.import_module(module)
    tokenizer = load_tokenizer(params.model, str(check_adapter(ws.adapter, "rerun `dvc repro train`")))
    model = PeftModel.from_pretrained(trainable_base(params, tokenizer), str(ws.adapter),
                                      is_trainable=True)
    precision = resolve_precision(t.precision)
    name = run_name("align")
    report_to, callbacks = trackers(params, name, ws)
    length = {"max_length": params.tokenize.max_length}
    own = {"dpo": length, "orpo": length,
           "kto": {**length, "desirable_weight": a.desirable_weight, "undesirable_weight": a.undesirable_weight},
           "grpo": {"num_generations": a.num_generations, "max_completion_length": a.max_completion_length,
                    "reward_weights": [r.weight for r in a.rewards]}}
    args = getattr(trl, config_class)(
        output_dir=output_dir, beta=a.beta, max_steps=a.max_steps, learning_rate=a.learning_rate,
        per_device_train_batch_size=a.per_device_train_batch_size,
        per_device_eval_batch_size=a.per_device_eval_batch_size,
        seed=a.seed, data_seed=a.seed, optim=optim_name(params), lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps, max_grad_norm=t.max_grad_norm,
        bf16=precision == "bf16", fp16=precision == "fp16",
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        full_determinism=device() == "cpu", use_cpu=device() == "cpu", save_strategy="no",
        logging_steps=t.logging_steps, report_to=report_to or "none", run_name=name,
        **own[a.method])
    if a.method == "grpo":
        from tasks.rewards import reward_functions

        # Held-out prompts are scored by generation (held_out_rewards), not by TRL's evaluation.
        inputs = {"reward_funcs": reward_functions(params, ws.root)}
    else:
        inputs = {"eval_dataset": datasets.Dataset.from_list(data["held_out"])}
        if a.method in WITH_REFERENCE:
            inputs["ref_model"] = None
    return getattr(trl, trainer_class)(
        model=model, args=args, processing_class=tokenizer, callbacks=callbacks,
        train_dataset=datasets.Dataset.from_list(data["train"]), **inputs)


def held_out_rewards(trainer, params: Params, rows: list[Row]) -> dict[str, float]:
    """The mean weighted reward (and each reward's mean) of the policy's greedy answers to the
    held-out prompts (grpo), answers up to align.max_completion_length tokens long."""
    from tasks.generation import generate

    a = params.align
    answering = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={
        "max_new_tokens": a.max_completion_length, "per_device_eval_batch_size": a.per_device_eval_batch_size})})
    asked = [r["prompt"] for r in rows]
    references = [r["references"] for r in rows]
    trainer.model.eval()  # no dropout in the greedy answers; trainer.train() switches back
    answers = generate(trainer.model, trainer.processing_class, asked, answering)
    scores = {f.__name__: f(prompts=asked, completions=answers, references=references)
              for f in trainer.reward_funcs}
    total = [sum(r.weight * s[i] for r, s in zip(a.rewards, scores.values(), strict=True))
             for i in range(len(rows))]
    return {"reward": _mean(total)} | {name: _mean(s) for name, s in scores.items()}


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 6)


def _per_step(log_history: list[dict[str, Any]], key: str) -> list[float]:
    return [round(entry[key], 6) for entry in log_history if key in entry]


def losses(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The training loss of the first and the last logged step ({} when train.logging_steps
    is above align.max_steps, so that no step was logged)."""
    logged = [entry["loss"] for entry in log_history if "loss" in entry]
    return {"first": logged[0], "last": logged[-1]} if logged else {}


def run(params: Params, ws: Workspace) -> dict[str, Any]:
    if not params.align.enabled:
        with atomic_path(ws.aligned) as tmp:
            tmp.mkdir()
            (tmp / "README.md").write_text(DISABLED_NOTE, encoding="utf-8")
        metrics: dict[str, Any] = {"enabled": False}
        write_json(ws.metrics("align"), metrics)
        log.info("align.enabled is false: nothing to do")
        return metrics
    method = params.align.method
    data = prompts(params, ws) if method == "grpo" else unpaired(params) if method == "kto" else pairs(params)
    log.info("%s on %d %s, %d held out", method.upper(), len(data["train"]), COUNTED[method],
             len(data["held_out"]))
    with tempfile.TemporaryDirectory() as scratch:
        trainer = _trainer(params, ws, data, scratch)
        from tasks.training import tracked

        with tracked(params, trainer.args):
            if method == "grpo":
                before = held_out_rewards(trainer, params, data["held_out"])
                result = trainer.train()
                held_out = {"sft": before, "aligned": held_out_rewards(trainer, params, data["held_out"])}
            else:
                result = trainer.train()
                kept = tuple(f"eval_{name}" for name in HELD_OUT[method])
                held_out = {k.removeprefix("eval_"): round(v, 6) for k, v in trainer.evaluate().items()
                            if k.startswith(kept)}
    loss = result.training_loss
    if math.isnan(loss):
        raise PipelineError(f"{method.upper()} loss is nan: lower align.learning_rate or align.beta")
    with atomic_path(ws.aligned) as tmp:
        trainer.model.save_pretrained(tmp, selected_adapters=["default"])
        normalize_adapter_config(tmp)
        save_tokenizer(trainer.processing_class, tmp)
    history = trainer.state.log_history
    metrics = {"enabled": True, "method": method, "train_loss": loss, "steps": result.global_step,
               "loss": losses(history), COUNTED[method]: {k: len(v) for k, v in data.items()},
               "held_out": held_out}
    if method == "grpo":  # per logged step: the sampled answers' mean reward, and the KL
        metrics |= {"reward": _per_step(history, "reward"), "kl": _per_step(history, "kl")}
    write_json(ws.metrics("align"), metrics)
    log.info("aligned adapter saved to %s: %s", ws.aligned, metrics)
    return metrics
