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

A challenger that passes is staged (copied into the registry) before it is made current, and
two optional steps can still stop it: the serve check (promote.serve_check_rows: the staged
entry served by `finetune serve`'s server must answer the first test prompts as evaluate's
tuned predictions; else the staging is undone and the stage fails) and approval
(promote.approval: required: the decision waits in registry/pending.json for `finetune
promote --approve` or `--reject`, which `decide` applies; the Prefect flow pauses for it).
With promote.registry: mlflow every candidate is also registered in MLflow
(tasks/mlflow_registry.py) before the local registry changes.

`dvc repro` and the Prefect flow both run this stage, so both apply the same rule. Reads
reports/predictions.jsonl, metrics/lm_eval.json and artifacts/merged/; writes metrics/promote.json and, when
promoted, registry/<model hash>/ (the model, predictions.jsonl, scored.json, promotion.json)
and registry/latest.json. The registry is `registry/` in the workspace unless the
FINETUNE_REGISTRY environment variable names another folder (storage that outlives a
remote worker's clone).

    finetune promote
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks import registry
from tasks.config import Params
from tasks.errors import PipelineError
from tasks.io import atomic_path, check_shape, damaged, read_json_state, read_jsonl, sha256_path, write_json
from tasks.scoring import HEADLINE, SCORE_FIELDS, headline_per_example, summarize
from tasks.workspace import Workspace

log = logging.getLogger("finetune.promote")

BASE = "base"  # the champion's name before anything was promoted
# promote.approval: required: the decision's approval.status, from promote to the person's answer.
PENDING, APPROVED, REJECTED = "pending", "approved", "rejected"


@dataclass(frozen=True)
class Candidate:
    """A challenger that passed the gate: its registry entry, written but not yet current."""

    path: Path
    sha256: str  # of artifacts/merged, which the entry copies
    created: bool  # by this promotion (a model promoted before keeps its entry)

    def discard(self) -> None:
        """Undoes staging: the entry goes unless it was there before."""
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)


def _scores(answers: list[str], stored: list[float] | None, references: list[str],
            params: Params) -> list[float]:
    """Per-row headline scores: the stored ones, else computed now (which loads the scorer)."""
    if stored is not None:
        return stored
    return headline_per_example(answers, references, params.model.task, params.evaluate.use_stemmer)


def champion_answers(entry: Path, rows: list[dict[str, Any]],
                     params: Params) -> tuple[list[str], list[float] | None, str]:
    """The champion's answers on `rows`, their stored scores if any, and how they were
    obtained: reused from its registry entry when made on the same rows and settings, else
    generated now."""
    predictions, scores, why = registry.stored(entry, rows, params)
    if predictions is not None:
        return predictions, scores, why
    from tasks.generation import outputs

    log.info("re-scoring the champion %s on the %d current test rows: %s", entry, len(rows), why)
    model, tokenizer = registry.load(entry, params)
    return outputs(model, tokenizer, [r["prompt"] for r in rows], params), None, f"generated: {why}"


def _champion(rows: list[dict[str, Any]], params: Params,
              ws: Workspace) -> tuple[str, list[str], list[float], str]:
    """(name, predictions, per-row scores, how obtained) of the model to beat."""
    references = [r["reference"] for r in rows]
    current = registry.latest(ws)
    if current is None:
        answers = [r["base"] for r in rows]
        kept = [r[SCORE_FIELDS["base"]] for r in rows] if all(SCORE_FIELDS["base"] in r for r in rows) else None
        return BASE, answers, _scores(answers, kept, references, params), "evaluate's base predictions"
    entry = Path(current["path"])
    if not entry.is_dir():
        raise PipelineError(f"{ws.latest} points at {entry}, which does not exist: restore it, "
                            f"or delete {ws.latest} to compare with the base model again")
    answers, kept, how = champion_answers(entry, rows, params)
    scores = _scores(answers, kept, references, params)
    if how.startswith("generated"):
        registry.store(entry, rows, answers, scores, params)  # for the next run to reuse
    return str(entry), answers, scores, how


def _stage_entry(rows: list[dict[str, Any]], scores: list[float], digest: str, params: Params,
                 ws: Workspace) -> Candidate:
    """The challenger's registry entry (the merged model, whose sha256 is `digest`, and its
    scored test predictions), written but not yet current. A model promoted before has one
    already: only what it was scored on is refreshed."""
    target = ws.registry / digest[:16]
    challenger = [r["tuned"] for r in rows]
    if target.is_dir():
        registry.store(target, rows, challenger, scores, params)
        return Candidate(target, digest, created=False)
    with atomic_path(target) as tmp:
        shutil.copytree(ws.merged, tmp)
        registry.store(tmp, rows, challenger, scores, params)
    return Candidate(target, digest, created=True)


def _apply(candidate: Candidate, decision: dict[str, Any], params_sha256: str, ws: Workspace) -> None:
    """Makes the staged entry the champion: MLflow's champion alias first (a failure there
    leaves the local registry as it was), then its promotion.json and latest.json."""
    if "mlflow" in decision:
        from tasks.mlflow_registry import crown

        crown(decision["mlflow"])
    write_json(candidate.path / registry.ENTRY_DECISION, decision)
    write_json(ws.latest, {
        "path": str(candidate.path), "sha256": candidate.sha256, "metric": decision["metric"],
        "score": decision["challenger"]["score"], "test_sha256": decision["test_sha256"],
        "champion": decision["champion"], "difference": decision["difference"],
        "params_sha256": params_sha256} | ({"lm_eval": decision["lm_eval"]} if "lm_eval" in decision else {}))


def capability(params: Params, ws: Workspace) -> dict[str, Any] | None:
    """The general-capability check of metrics/lm_eval.json under promote.max_regression:
    each task's base and tuned score and drop, and the tasks dropping by more than allowed.
    None when evaluate.lm_eval_tasks is empty."""
    from tasks.harness import settings

    if not params.evaluate.lm_eval_tasks:
        return None
    file = ws.metrics("lm_eval")
    recover = "rerun `dvc repro evaluate`"
    found = read_json_state(file, required={"scores": dict}, recover=recover) if file.is_file() else None
    if found is None or {k: found.get(k) for k in settings(params)} != settings(params):
        raise PipelineError(f"{file} was not made with the current evaluate.lm_eval_tasks, lm_eval_limit "
                            "and lm_eval_num_fewshot: run `finetune evaluate` (or `dvc repro`) first")
    limit = params.promote.max_regression
    number = (int, float)
    for name, row in found["scores"].items():
        check_shape(f"{file} (scores.{name})", row, recover, dict,
                    {"metric": str, "base": number, "tuned": number, "drop": number})
    tasks = {name: {k: row[k] for k in ("metric", "base", "tuned", "drop")}
             for name, row in found["scores"].items()}
    regressed = [name for name, row in tasks.items() if limit is not None and row["drop"] > limit]
    return {"max_regression": limit, "tasks": tasks, "regressed": regressed}


def _regression_reason(check: dict[str, Any]) -> str:
    limit = check["max_regression"]
    return "; ".join(f"{name} {row['metric']} dropped {row['drop']:.4f} (base {row['base']:.4f} -> tuned "
                     f"{row['tuned']:.4f}) > max_regression {limit}"
                     for name, row in check["tasks"].items() if name in check["regressed"])


def run(params: Params, ws: Workspace) -> dict[str, Any]:
    recover = "rerun `dvc repro evaluate`"
    rows = read_jsonl(ws.predictions, required={"id": object, "prompt": str, "reference": str, "base": str,
                                                "tuned": str}, recover=recover)
    if not rows:
        raise damaged(ws.predictions, "empty", recover)
    references = [r["reference"] for r in rows]
    name, _, theirs, how = _champion(rows, params, ws)
    kept = [r[SCORE_FIELDS["tuned"]] for r in rows] if all(SCORE_FIELDS["tuned"] in r for r in rows) else None
    ours = _scores([r["tuned"] for r in rows], kept, references, params)
    decision = _gate(rows, name, how, theirs, ours, params, ws)
    verdict = _verdict(decision, how)
    stays = _stays(ws)
    ws.workspace_registry.mkdir(exist_ok=True)  # DVC expects the (persistent) output to exist
    ws.registry.mkdir(parents=True, exist_ok=True)
    if decision["promoted"] or params.promote.registry == "mlflow":
        decision["challenger"]["sha256"] = sha256_path(ws.merged)
    if params.promote.registry == "mlflow":  # every candidate, promoted or not, before the local registry changes
        from tasks.mlflow_registry import register

        decision["mlflow"] = register(ws.merged, decision["challenger"]["sha256"], decision, params, ws)
    _supersede(ws)
    if not decision["promoted"]:
        decision["reason"] = f"{verdict}: not promoted; {stays}"
        return _record(decision, ws)
    candidate = _stage_entry(rows, ours, decision["challenger"]["sha256"], params, ws)
    if params.promote.serve_check_rows:
        served = serve_check(candidate.path, rows[:params.promote.serve_check_rows], params)
        decision["serve_check"] = served
        if served["differing"]:
            candidate.discard()
            decision["promoted"] = False
            decision["reason"] = (f"{verdict}; served, the candidate answered {len(served['differing'])} of "
                                  f"{served['rows']} test prompts differently from evaluate's tuned predictions "
                                  f"(first: id {served['differing'][0]['id']}): promotion undone; {stays}")
            _record(decision, ws)
            raise PipelineError(f"{decision['reason']}; each differing prompt, expected and served answer "
                                f"are in {ws.metrics('promote')} (serve_check.differing)")
    if params.promote.approval == "required":
        decision["promoted"] = False
        decision["approval"] = {"status": PENDING}
        decision["reason"] = (f"{verdict}: awaiting approval (promote.approval: required): "
                              "`finetune promote --approve` or `--reject`, or the Prefect run's form")
        write_json(ws.pending, {"path": str(candidate.path), "sha256": candidate.sha256,
                                "created": candidate.created, "params_sha256": params.digest(),
                                "verdict": verdict, "decision": decision})
        return _record(decision, ws)
    decision["reason"] = f"{verdict}: promoted to {candidate.path}"
    _apply(candidate, decision, params.digest(), ws)
    return _record(decision, ws)


def _gate(rows: list[dict[str, Any]], name: str, how: str, theirs: list[float], ours: list[float],
          params: Params, ws: Workspace) -> dict[str, Any]:
    """The decision: both scores, the paired difference with its CI, the capability check,
    and whether the challenger passes (`promoted`, before the steps after the gate)."""
    cfg = params.evaluate
    difference = summarize({"difference": [a - b for a, b in zip(ours, theirs, strict=True)]},
                           cfg.bootstrap_samples, cfg.confidence_level, cfg.seed)["difference"]
    decision: dict[str, Any] = {
        "metric": HEADLINE[params.model.task], "num_examples": len(rows), "test_sha256": registry.test_digest(rows),
        "champion": {"model": name, "score": round(sum(theirs) / len(theirs), 6), "predictions": how},
        "challenger": {"model": ws.merged.relative_to(ws.root).as_posix(), "score": round(sum(ours) / len(ours), 6)},
        "difference": difference, "confidence_level": cfg.confidence_level,
        "min_gain": params.promote.min_gain, "promoted": difference["mean"] >= params.promote.min_gain}
    check = capability(params, ws)
    if check is not None:
        decision["lm_eval"] = check
        decision["promoted"] = decision["promoted"] and not check["regressed"]
    return decision


def _verdict(decision: dict[str, Any], how: str) -> str:
    """The gate's decision in one line: scores, difference and CI, min_gain, capability."""
    difference, threshold = decision["difference"], decision["min_gain"]
    verdict = (f"{decision['metric']} challenger {decision['challenger']['score']:.4f} vs champion "
               f"({decision['champion']['model']}) {decision['champion']['score']:.4f}: difference "
               f"{difference['mean']:+.4f} ({decision['confidence_level']:.0%} CI [{difference['ci_low']:+.4f}, "
               f"{difference['ci_high']:+.4f}])")
    if how.startswith("generated"):
        verdict = f"champion re-scored ({how.removeprefix('generated: ')}); {verdict}"
    verdict += f" {'>=' if difference['mean'] >= threshold else '<'} min_gain {threshold}"
    check = decision.get("lm_eval")
    if check is not None and check["regressed"]:
        verdict += f"; general capability lost: {_regression_reason(check)}"
    elif check is not None and check["max_regression"] is not None:
        verdict += (f"; no task of evaluate.lm_eval_tasks dropped by more than max_regression "
                    f"{check['max_regression']}")
    return verdict


def _stays(ws: Workspace) -> str:
    """What a promotion not applied leaves current."""
    return "the champion stays current" if registry.latest(ws) is not None else "nothing was promoted yet"


def _record(decision: dict[str, Any], ws: Workspace) -> dict[str, Any]:
    """metrics/promote.json: the decision and the champion it leaves current."""
    current = registry.latest(ws)
    decision["latest"] = current["path"] if current else None
    write_json(ws.metrics("promote"), decision)
    log.info(decision["reason"])
    return decision


def serve_check(entry: Path, rows: list[dict[str, Any]], params: Params) -> dict[str, Any]:
    """The staged entry served (`finetune serve`'s server) and asked `rows`' prompts: the
    prompts whose greedy answers differ from evaluate's tuned predictions (both compared
    without surrounding whitespace, which evaluate strips)."""
    from tasks.serve import answers

    log.info("serve check: %d test prompts to %s served by transformers serve", len(rows), entry)
    served = answers(entry, [r["prompt"] for r in rows], params.evaluate.max_new_tokens)
    differing = [{"id": r["id"], "prompt": r["prompt"], "expected": r["tuned"], "served": text.strip()}
                 for r, text in zip(rows, served, strict=True) if text.strip() != r["tuned"].strip()]
    return {"rows": len(rows), "differing": differing}


def _pending(ws: Workspace) -> dict[str, Any] | None:
    if not ws.pending.is_file():
        return None
    return read_json_state(ws.pending, recover=f"delete {ws.pending} and rerun `finetune promote`", required={
        "path": str, "sha256": str, "created": bool, "params_sha256": str, "verdict": str, "decision": dict})


def _supersede(ws: Workspace) -> None:
    """A new decision replaces one still awaiting approval: that candidate is dropped."""
    if (waiting := _pending(ws)) is not None:
        log.warning("the candidate awaiting approval (%s) is superseded by this decision", waiting["path"])
        Candidate(Path(waiting["path"]), waiting["sha256"], waiting["created"]).discard()
        ws.pending.unlink()


def decide(approve: bool, note: str, params: Params, ws: Workspace) -> dict[str, Any]:
    """Applies (approve) or drops the promotion awaiting approval, with the person's `note`;
    rewrites metrics/promote.json with the outcome and returns it."""
    waiting = _pending(ws)
    if waiting is None:
        raise PipelineError(f"no promotion awaits approval ({ws.pending} does not exist): promote "
                            "leaves one there with promote.approval: required")
    if waiting["params_sha256"] != params.digest():
        raise PipelineError("params.yaml changed since promote decided: run `dvc repro` (or the flow) to "
                            "decide again on the current params, then approve or reject that decision")
    candidate = Candidate(Path(waiting["path"]), waiting["sha256"], waiting["created"])
    decision = waiting["decision"]
    verdict = waiting["verdict"]
    status = APPROVED if approve else REJECTED
    decision["approval"] = {"status": status, "note": note}
    decision["promoted"] = approve
    said = f" ({note})" if note else ""
    if approve:
        decision["reason"] = f"{verdict}: approved{said}; promoted to {candidate.path}"
        _apply(candidate, decision, waiting["params_sha256"], ws)
    else:
        candidate.discard()
        decision["reason"] = f"{verdict}: rejected{said}; {_stays(ws)}"
    ws.pending.unlink()
    return _record(decision, ws)
