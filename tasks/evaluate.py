"""evaluate: run the base model and the tuned model (base + adapter: SFT's, or the
DPO-aligned one when align is on) on the test split and score both side by side: the
generative tasks (causal_lm, seq2seq) generate and are scored with ROUGE-1/2/L/Lsum,
sequence_classification predicts a class and is scored with accuracy and macro-F1 (the base
then has the new, untrained head: chance level).

Both runs use one loaded base (quantized as in training): the base's outputs come first,
then the adapter is attached to the same weights. (Not PEFT's disable_adapter: for soft
prompts on a classifier it keeps the trained head, and it fails on encoders.) Reads artifacts/adapter/ and
data/prepared/test.jsonl; writes metrics/eval.json (base, tuned, delta; each score with a
bootstrap confidence interval), reports/predictions.jsonl and reports/eval_preview.md.

With `evaluate.lm_eval_tasks` listed, both models are also run through EleutherAI's
lm-evaluation-harness (tasks/harness.py, the general-capability check) and
metrics/lm_eval.json holds each task's main metric side by side; with none, that file only
records that the check is off.

    finetune evaluate
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tasks import harness, paths
from tasks.config import Params
from tasks.generation import generate, predict_labels, test_rows
from tasks.io import atomic_path, write_json, write_jsonl
from tasks.scoring import HEADLINE, References, classification, metric_names, per_example, summarize

log = logging.getLogger("finetune.evaluate")


def load_base_and_tokenizer(params: Params, adapter: Path | None = None):
    """The base model, quantized as in training, and the tokenizer of `adapter` (default: the
    tuned adapter)."""
    from tasks.adapters import tuned_adapter
    from tasks.modeling import load_base, load_tokenizer, match_vocab

    tokenizer = load_tokenizer(params.model, str(adapter or tuned_adapter(params)))
    base = load_base(params, quantized=params.quant.load_in_4bit)
    match_vocab(base, tokenizer)
    base.eval()
    return base, tokenizer


def attach_adapter(base, params: Params, adapter: Path | None = None):
    """`base` with `adapter` (default: SFT's, or the DPO-aligned one when align is on) on it,
    in place: no second copy of the weights."""
    from peft import PeftModel

    from tasks.adapters import tuned_adapter

    model = PeftModel.from_pretrained(base, str(adapter or tuned_adapter(params)))
    model.eval()
    return model


def _preview(rows: list[dict[str, Any]], n: int) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| id | reference | base | tuned |", "|---|---|---|---|"]
    lines += [f"| {r['id']} | {cell(r['reference'])} | {cell(r['base'])} | {cell(r['tuned'])} |"
              for r in rows[:n]]
    return "\n".join(lines) + "\n"


def outputs(model, tokenizer, prompts: list[str], params: Params) -> list[str]:
    """What the model answers: generated text, or the class name it picks."""
    if params.model.task == "sequence_classification":
        return predict_labels(model, tokenizer, prompts, params)
    return generate(model, tokenizer, prompts, params)


def scores(predictions: list[str], references: References, params: Params) -> dict[str, Any]:
    cfg = params.evaluate
    if params.model.task == "sequence_classification":
        return classification(predictions, [r if isinstance(r, str) else r[0] for r in references], params.model.labels or [],
                              cfg.bootstrap_samples, cfg.confidence_level, cfg.seed)
    return summarize(per_example(predictions, references, cfg.use_stemmer),
                     cfg.bootstrap_samples, cfg.confidence_level, cfg.seed)


def run(params: Params) -> dict[str, Any]:
    cfg = params.evaluate
    rows = test_rows(params)
    model, tokenizer = load_base_and_tokenizer(params)
    prompts = [r["prompt"] for r in rows]
    references = [r["completion"].strip() for r in rows]
    # Several references per row (data.references): scored against the best of them.
    scored = [r.get("references") or [ref] for r, ref in zip(rows, references, strict=True)] \
        if any("references" in r for r in rows) else references
    log.info("running %d test examples through the base model", len(rows))
    base = outputs(model, tokenizer, prompts, params)
    general = harness.score(model, tokenizer, params) if cfg.lm_eval_tasks else None
    model = attach_adapter(model, params)
    log.info("running %d test examples through the tuned model", len(rows))
    tuned = outputs(model, tokenizer, prompts, params)
    general_tuned = harness.score(model, tokenizer, params) if cfg.lm_eval_tasks else None
    result: dict[str, Any] = {"base": scores(base, scored, params),
                              "tuned": scores(tuned, scored, params)}
    result["delta"] = {t: round(result["tuned"][t]["mean"] - result["base"][t]["mean"], 6)
                       for t in metric_names(params.model.task)}
    predictions = [{"id": r["id"], "prompt": r["prompt"], "reference": ref, "base": b, "tuned": t}
                   | ({"references": r["references"]} if "references" in r else {})
                   for r, ref, b, t in zip(rows, references, base, tuned, strict=True)]
    with atomic_path(paths.PREDICTIONS) as tmp:
        write_jsonl(tmp, predictions)
    with atomic_path(paths.EVAL_PREVIEW) as tmp:
        tmp.write_text(_preview(predictions, cfg.preview_rows), encoding="utf-8")
    write_json(paths.METRICS["eval"], result)
    capability = harness.write(params, general, general_tuned)
    for row in capability["scores"].values():
        log.info("%s %s base %.4f -> tuned %.4f", row["task"], row["metric"], row["base"], row["tuned"])
    headline = HEADLINE[params.model.task]
    log.info("%s base %.4f -> tuned %.4f", headline, result["base"][headline]["mean"],
             result["tuned"][headline]["mean"])
    return result
