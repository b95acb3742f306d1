"""promote: the release gate, champion against challenger.

The challenger is the model this run exported (artifacts/merged/; its test predictions are
evaluate's `tuned` column). The champion is the model `registry/latest.json` points at, or,
before anything was promoted, the base model (evaluate's `base` column). Both are scored on
the same test rows with the task's headline metric (ROUGE-L for causal_lm and seq2seq,
accuracy for sequence_classification), and the challenger is promoted only when its mean
beats the champion's by at least `promote.min_gain`. The paired difference (challenger minus
champion, per example) is reported with a percentile bootstrap confidence interval
(`evaluate.bootstrap_samples`, `confidence_level`, `seed`: deterministic).

Each registry entry keeps the predictions it was last scored with and the hash of those test
rows (`scored.json`): when the test rows and generation settings are unchanged the champion's
stored predictions are reused; otherwise promote says so and generates with the champion on
the current rows (and stores those for the next run).

With `evaluate.lm_eval_tasks` listed, the release also has to keep what the base knew: when
`promote.max_regression` is set, a challenger that drops any of those tasks' main metric by
more than that from the base (metrics/lm_eval.json, evaluate's general-capability check) is
refused, whatever it gains on the test set. The base, not the champion, is the reference
there: a chain of champions each losing a little less than max_regression would otherwise
drift away from the base without limit.

`dvc repro` and the Prefect flow both run this stage, so both apply the same rule. Reads
reports/predictions.jsonl, metrics/lm_eval.json and artifacts/merged/; writes metrics/promote.json and, when
promoted, registry/<model hash>/ (the model, predictions.jsonl, scored.json, promotion.json)
and registry/latest.json. The registry is `registry/` in the workspace unless the
FINETUNE_REGISTRY environment variable names another folder (storage that outlives a
remote worker's clone).

    finetune promote
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from tasks import paths
from tasks.config import Params
from tasks.errors import PipelineError
from tasks.io import atomic_path, read_jsonl, sha256_path, write_json, write_jsonl
from tasks.scoring import HEADLINE, headline_per_example, summarize

log = logging.getLogger("finetune.promote")

# Files a registry entry holds beside the model.
ENTRY_PREDICTIONS = "predictions.jsonl"  # {id, prompt, reference, prediction} per test row
ENTRY_SCORED = "scored.json"  # what those predictions were made on: test_sha256, generation
ENTRY_DECISION = "promotion.json"  # the decision that promoted it
BASE = "base"  # the champion's name before anything was promoted


def latest() -> dict[str, Any] | None:
    """What `registry/latest.json` points at now, if anything was ever promoted."""
    if not paths.LATEST.is_file():
        return None
    return json.loads(paths.LATEST.read_text())


def test_digest(rows: list[dict[str, Any]]) -> str:
    """sha256 of the scored test rows (ids, prompts, references, in order)."""
    key = [[r["id"], r["prompt"], r["reference"]] for r in rows]
    return hashlib.sha256(json.dumps(key, ensure_ascii=False).encode()).hexdigest()


def generation_settings(params: Params) -> dict[str, Any]:
    """The settings besides the model and rows that decide what a model answers."""
    return {"task": params.model.task, "max_new_tokens": params.evaluate.max_new_tokens,
            "max_length": params.tokenize.max_length, "labels": params.model.labels}


def _store(entry: Path, rows: list[dict[str, Any]], predictions: list[str], params: Params) -> None:
    """Writes a model's test predictions into its registry entry; scored.json last, so it only
    ever describes a complete predictions file."""
    with atomic_path(entry / ENTRY_PREDICTIONS) as tmp:
        write_jsonl(tmp, [{"id": r["id"], "prompt": r["prompt"], "reference": r["reference"],
                           "prediction": p} for r, p in zip(rows, predictions, strict=True)])
    write_json(entry / ENTRY_SCORED, {"test_sha256": test_digest(rows),
                                      "generation": generation_settings(params)})


def _load(entry: Path, params: Params):
    """A registry entry's model and tokenizer: a standalone model, or an adapter export
    (PEFT methods that do not merge) loaded on the configured base."""
    from tasks.modeling import load_tokenizer, model_class

    tokenizer = load_tokenizer(params.model, str(entry))
    if (entry / "adapter_config.json").is_file():
        from peft import PeftModel

        from tasks.modeling import load_base, match_vocab

        base = load_base(params, quantized=params.quant.load_in_4bit)
        match_vocab(base, tokenizer)
        model = PeftModel.from_pretrained(base, str(entry))
    else:
        model = model_class(params.model.task).from_pretrained(str(entry))
    model.eval()
    return model, tokenizer


def champion_predictions(entry: Path, rows: list[dict[str, Any]],
                         params: Params) -> tuple[list[str], str]:
    """The champion's answers on `rows`, and how they were obtained: reused from its
    registry entry when made on the same rows and settings, else generated now."""
    from tasks.evaluate import outputs

    scored_file = entry / ENTRY_SCORED
    scored = json.loads(scored_file.read_text()) if scored_file.is_file() else None
    digest = test_digest(rows)
    if scored and scored["test_sha256"] == digest and scored["generation"] == generation_settings(params):
        return [r["prediction"] for r in read_jsonl(entry / ENTRY_PREDICTIONS)], "reused"
    if scored is None:
        why = "it has no stored predictions"
    elif scored["test_sha256"] != digest:
        why = (f"the test set changed since it was scored (sha256 {scored['test_sha256'][:12]} -> "
               f"{digest[:12]})")
    else:
        why = "the generation settings changed since it was scored"
    log.info("re-scoring the champion %s on the %d current test rows: %s", entry, len(rows), why)
    model, tokenizer = _load(entry, params)
    predictions = outputs(model, tokenizer, [r["prompt"] for r in rows], params)
    _store(entry, rows, predictions, params)
    return predictions, f"generated: {why}"


def _champion(rows: list[dict[str, Any]], params: Params) -> tuple[str, list[str], str]:
    """(name, predictions, how obtained) of the model to beat."""
    current = latest()
    if current is None:
        return BASE, [r["base"] for r in rows], "evaluate's base predictions"
    entry = Path(current["path"])
    if not entry.is_dir():
        raise PipelineError(f"{paths.LATEST} points at {entry}, which does not exist: restore it, "
                            f"or delete {paths.LATEST} to compare with the base model again")
    predictions, how = champion_predictions(entry, rows, params)
    return str(entry), predictions, how


def _promote(rows: list[dict[str, Any]], decision: dict[str, Any], params: Params) -> Path:
    digest = sha256_path(paths.MERGED)
    target = paths.REGISTRY / digest[:16]
    challenger = [r["tuned"] for r in rows]
    if not target.is_dir():
        with atomic_path(target) as tmp:
            shutil.copytree(paths.MERGED, tmp)
            _store(tmp, rows, challenger, params)
            write_json(tmp / ENTRY_DECISION, decision)
    else:  # the same model promoted again: refresh what it was scored on
        _store(target, rows, challenger, params)
        write_json(target / ENTRY_DECISION, decision)
    write_json(paths.LATEST, {
        "path": str(target), "sha256": digest, "metric": decision["metric"],
        "score": decision["challenger"]["score"], "test_sha256": decision["test_sha256"],
        "champion": decision["champion"], "difference": decision["difference"],
        "params_sha256": params.digest()} | ({"lm_eval": decision["lm_eval"]} if "lm_eval" in decision else {}))
    return target


def capability(params: Params) -> dict[str, Any] | None:
    """The general-capability check of metrics/lm_eval.json under promote.max_regression:
    each task's base and tuned score and drop, and the tasks dropping by more than allowed.
    None when evaluate.lm_eval_tasks is empty."""
    from tasks.harness import settings

    if not params.evaluate.lm_eval_tasks:
        return None
    file = paths.METRICS["lm_eval"]
    found = json.loads(file.read_text()) if file.is_file() else None
    if found is None or {k: found.get(k) for k in settings(params)} != settings(params):
        raise PipelineError(f"{file} was not made with the current evaluate.lm_eval_tasks, lm_eval_limit "
                            "and lm_eval_num_fewshot: run `finetune evaluate` (or `dvc repro`) first")
    limit = params.promote.max_regression
    tasks = {name: {k: row[k] for k in ("metric", "base", "tuned", "drop")}
             for name, row in found["scores"].items()}
    regressed = [name for name, row in tasks.items() if limit is not None and row["drop"] > limit]
    return {"max_regression": limit, "tasks": tasks, "regressed": regressed}


def _regression_reason(check: dict[str, Any]) -> str:
    limit = check["max_regression"]
    return "; ".join(f"{name} {row['metric']} dropped {row['drop']:.4f} (base {row['base']:.4f} -> tuned "
                     f"{row['tuned']:.4f}) > max_regression {limit}"
                     for name, row in check["tasks"].items() if name in check["regressed"])


def run(params: Params) -> dict[str, Any]:
    cfg = params.evaluate
    task = params.model.task
    metric = HEADLINE[task]
    rows = read_jsonl(paths.PREDICTIONS)
    references = [r["reference"] for r in rows]
    name, champion, how = _champion(rows, params)
    theirs = headline_per_example(champion, references, task, cfg.use_stemmer)
    ours = headline_per_example([r["tuned"] for r in rows], references, task, cfg.use_stemmer)
    paired = summarize({"difference": [a - b for a, b in zip(ours, theirs, strict=True)]},
                       cfg.bootstrap_samples, cfg.confidence_level, cfg.seed)
    difference = paired["difference"]
    threshold = params.promote.min_gain
    decision: dict[str, Any] = {
        "metric": metric, "num_examples": len(rows), "test_sha256": test_digest(rows),
        "champion": {"model": name, "score": round(sum(theirs) / len(theirs), 6), "predictions": how},
        "challenger": {"model": str(paths.MERGED), "score": round(sum(ours) / len(ours), 6)},
        "difference": difference, "confidence_level": cfg.confidence_level,
        "min_gain": threshold, "promoted": difference["mean"] >= threshold}
    check = capability(params)
    if check is not None:
        decision["lm_eval"] = check
        decision["promoted"] = decision["promoted"] and not check["regressed"]
    paths.WORKSPACE_REGISTRY.mkdir(exist_ok=True)  # DVC expects the (persistent) output to exist
    paths.REGISTRY.mkdir(parents=True, exist_ok=True)
    verdict = (f"{metric} challenger {decision['challenger']['score']:.4f} vs champion ({name}) "
               f"{decision['champion']['score']:.4f}: difference {difference['mean']:+.4f} "
               f"({cfg.confidence_level:.0%} CI [{difference['ci_low']:+.4f}, {difference['ci_high']:+.4f}])")
    if how.startswith("generated"):
        verdict = f"champion re-scored ({how.removeprefix('generated: ')}); {verdict}"
    gained = difference["mean"] >= threshold
    verdict += f" {'>=' if gained else '<'} min_gain {threshold}"
    if check is not None and check["regressed"]:
        verdict += f"; general capability lost: {_regression_reason(check)}"
    elif check is not None and check["max_regression"] is not None:
        verdict += (f"; no task of evaluate.lm_eval_tasks dropped by more than max_regression "
                    f"{check['max_regression']}")
    if decision["promoted"]:
        decision["reason"] = f"{verdict}: promoted"
        target = _promote(rows, decision, params)
        decision["reason"] += f" to {target}"
    else:
        stays = "the champion stays current" if name != BASE else "nothing was promoted yet"
        decision["reason"] = f"{verdict}: not promoted; {stays}"
    current = latest()
    decision["latest"] = current["path"] if current else None
    write_json(paths.METRICS["promote"], decision)
    log.info(decision["reason"])
    return decision
