"""evaluate: run the base model and the tuned model (base + adapter: SFT's, or the
DPO-aligned one when align is on) on the test split and score both side by side: the
generative tasks (causal_lm, seq2seq) generate and are scored with ROUGE-1/2/L/Lsum,
sequence_classification predicts a class and is scored with accuracy and macro-F1 (the base
then has the new, untrained head: chance level).

Both runs use one loaded base (quantized as in training): the base's outputs come first,
then the adapter is attached to the same weights. (Not PEFT's disable_adapter: for soft
prompts on a classifier it keeps the trained head, and it fails on encoders.) Reads artifacts/adapter/ and
data/prepared/test.jsonl; writes metrics/eval.json (base, tuned, delta; each score with a
bootstrap confidence interval), reports/predictions.jsonl and reports/eval_preview.md. With full
fine-tuning (peft.method none) the tuned model is train's whole model, loaded in the base's
place once the base has answered.

With `evaluate.lm_eval_tasks` listed, both models are also run through EleutherAI's
lm-evaluation-harness (tasks/harness.py, the general-capability check) and
metrics/lm_eval.json holds each task's main metric side by side; with none, that file only
records that the check is off.

    finetune evaluate
"""

from __future__ import annotations

import logging
from typing import Any

from tasks import harness
from tasks.adapters import tuned_adapter
from tasks.config import Params
from tasks.generation import attach_adapter, load_base_and_tokenizer, outputs, test_rows
from tasks.io import atomic_path, write_json, write_jsonl
from tasks.modeling import load_standalone
from tasks.scoring import HEADLINE, SCORE_FIELDS, headline_per_example, metric_names, scores
from tasks.workspace import Workspace

log = logging.getLogger("finetune.evaluate")


def _preview(rows: list[dict[str, Any]], n: int) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| id | reference | base | tuned |", "|---|---|---|---|"]
    lines += [f"| {r['id']} | {cell(r['reference'])} | {cell(r['base'])} | {cell(r['tuned'])} |"
              for r in rows[:n]]
    return "\n".join(lines) + "\n"


def run(params: Params, ws: Workspace) -> dict[str, Any]:
    cfg = params.evaluate
    rows = test_rows(params, ws)
    model, tokenizer = load_base_and_tokenizer(params, ws)
    prompts = [r["prompt"] for r in rows]
    references = [r["completion"].strip() for r in rows]
    # Several references per row (data.references): scored against the best of them.
    scored = [r.get("references") or [ref] for r, ref in zip(rows, references, strict=True)] \
        if any("references" in r for r in rows) else references
    log.info("running %d test examples through the base model", len(rows))
    base = outputs(model, tokenizer, prompts, params)
    general = harness.score(model, tokenizer, params) if cfg.lm_eval_tasks else None
    if params.peft.full_finetune:
        dtype = model.dtype
        del model  # the base's weights make way for the tuned model's
        model = load_standalone(params, tuned_adapter(params, ws), dtype)[0]
    else:
        model = attach_adapter(model, params, ws)
    log.info("running %d test examples through the tuned model", len(rows))
    tuned = outputs(model, tokenizer, prompts, params)
    general_tuned = harness.score(model, tokenizer, params) if cfg.lm_eval_tasks else None
    result: dict[str, Any] = {"base": scores(base, scored, params),
                              "tuned": scores(tuned, scored, params)}
    result["delta"] = {t: round(result["tuned"][t]["mean"] - result["base"][t]["mean"], 6)
                       for t in metric_names(params.model.task)}
    # Each answer's headline score against the row's reference, as promote compares them:
    # stored so promote's paired test needs no scorer (and no torch) when nothing changed.
    headline = HEADLINE[params.model.task]
    base_scores, tuned_scores = (headline_per_example(answers, references, params.model.task, cfg.use_stemmer)
                                 for answers in (base, tuned))
    predictions = [{"id": r["id"], "prompt": r["prompt"], "reference": ref, "base": b, "tuned": t}
                   | ({"references": r["references"]} if "references" in r else {})
                   | {SCORE_FIELDS["base"]: bs, SCORE_FIELDS["tuned"]: ts}
                   for r, ref, b, t, bs, ts in zip(rows, references, base, tuned, base_scores, tuned_scores,
                                                   strict=True)]
    with atomic_path(ws.predictions) as tmp:
        write_jsonl(tmp, predictions)
    with atomic_path(ws.eval_preview) as tmp:
        tmp.write_text(_preview(predictions, cfg.preview_rows), encoding="utf-8")
    write_json(ws.metrics("eval"), result)
    capability = harness.write(params, ws, general, general_tuned)
    for row in capability["scores"].values():
        log.info("%s %s base %.4f -> tuned %.4f", row["task"], row["metric"], row["base"], row["tuned"])
    log.info("%s base %.4f -> tuned %.4f", headline, result["base"][headline]["mean"],
             result["tuned"][headline]["mean"])
    return result
