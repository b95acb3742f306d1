"""evaluate: generate on the test split with the base model and with the tuned model (base
+ adapter: SFT's, or the DPO-aligned one when align is on), and score both with
ROUGE-1/2/L/Lsum side by side.

Both generations use one loaded base (quantized as in training): the base's outputs come
from the same model with the adapter switched off. Reads artifacts/adapter/ and
data/prepared/test.jsonl; writes metrics/eval.json (base, tuned, delta; each score with a
bootstrap confidence interval), reports/predictions.jsonl and reports/eval_preview.md.

    finetune evaluate
"""

from __future__ import annotations

import logging
from typing import Any

from tasks import paths
from tasks.config import Params
from tasks.generation import generate, test_rows
from tasks.io import atomic_path, write_json, write_jsonl
from tasks.scoring import ROUGE_TYPES, per_example, summarize

log = logging.getLogger("finetune.evaluate")


def load_tuned(params: Params):
    """The base model, quantized as in training, with the tuned adapter attached (SFT's, or
    the DPO-aligned one when align is on)."""
    from peft import PeftModel

    from tasks.adapters import tuned_adapter
    from tasks.modeling import load_base, load_tokenizer, match_vocab

    adapter = tuned_adapter(params)
    tokenizer = load_tokenizer(params.model, str(adapter))
    base = load_base(params, quantized=params.quant.load_in_4bit)
    match_vocab(base, tokenizer)
    model = PeftModel.from_pretrained(base, str(adapter))
    model.eval()
    return model, tokenizer


def _preview(rows: list[dict[str, Any]], n: int) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| id | reference | base | tuned |", "|---|---|---|---|"]
    lines += [f"| {r['id']} | {cell(r['reference'])} | {cell(r['base'])} | {cell(r['tuned'])} |"
              for r in rows[:n]]
    return "\n".join(lines) + "\n"


def run(params: Params) -> dict[str, Any]:
    cfg = params.evaluate
    rows = test_rows(params)
    model, tokenizer = load_tuned(params)
    prompts = [r["prompt"] for r in rows]
    references = [r["completion"].strip() for r in rows]
    log.info("generating %d test examples with the base model", len(rows))
    with model.disable_adapter():
        base = generate(model, tokenizer, prompts, params)
    log.info("generating %d test examples with the tuned model", len(rows))
    tuned = generate(model, tokenizer, prompts, params)
    result: dict[str, Any] = {}
    for name, outputs in (("base", base), ("tuned", tuned)):
        result[name] = summarize(per_example(outputs, references, cfg.use_stemmer),
                                 cfg.bootstrap_samples, cfg.confidence_level, cfg.seed)
    result["delta"] = {t: round(result["tuned"][t]["mean"] - result["base"][t]["mean"], 6)
                       for t in ROUGE_TYPES}
    predictions = [{"id": r["id"], "prompt": r["prompt"], "reference": ref, "base": b, "tuned": t}
                   for r, ref, b, t in zip(rows, references, base, tuned, strict=True)]
    with atomic_path(paths.PREDICTIONS) as tmp:
        write_jsonl(tmp, predictions)
    with atomic_path(paths.EVAL_PREVIEW) as tmp:
        tmp.write_text(_preview(predictions, cfg.preview_rows), encoding="utf-8")
    write_json(paths.METRICS["eval"], result)
    log.info("ROUGE-L base %.4f -> tuned %.4f", result["base"]["rougeL"]["mean"],
             result["tuned"]["rougeL"]["mean"])
    return result
