"""promote: the promotion gate. Copies the exported model into the registry and points
`registry/latest.json` at it only when the tuned model beats the base by at least
`promote.min_gain` on the task's headline metric (ROUGE-L for causal_lm and seq2seq, accuracy
for sequence_classification); otherwise the previously promoted model stays current.

`dvc repro` and the Prefect flow both run this stage, so both apply the same rule.
Reads metrics/eval.json and artifacts/merged/; writes metrics/promote.json and, when
promoted, registry/<model hash>/ and registry/latest.json.

    finetune promote
"""

from __future__ import annotations

import json
import logging
import shutil
from typing import Any

from tasks import paths
from tasks.config import Params
from tasks.io import atomic_path, sha256_path, write_json
from tasks.scoring import HEADLINE

log = logging.getLogger("finetune.promote")


def latest() -> dict[str, Any] | None:
    """What `registry/latest.json` points at now, if anything was ever promoted."""
    if not paths.LATEST.is_file():
        return None
    return json.loads(paths.LATEST.read_text())


def run(params: Params) -> dict[str, Any]:
    evaluation = json.loads(paths.METRICS["eval"].read_text())
    metric = HEADLINE[params.model.task]
    base, tuned = evaluation["base"][metric]["mean"], evaluation["tuned"][metric]["mean"]
    gain = round(tuned - base, 6)
    threshold = params.promote.min_gain
    paths.REGISTRY.mkdir(exist_ok=True)  # DVC expects the (persistent) output to exist
    decision: dict[str, Any] = {"metric": metric, "base": base, "tuned": tuned, "gain": gain,
                                "min_gain": threshold, "promoted": gain >= threshold}
    if decision["promoted"]:
        digest = sha256_path(paths.MERGED)
        target = paths.REGISTRY / digest[:16]
        if not target.is_dir():
            with atomic_path(target) as tmp:
                shutil.copytree(paths.MERGED, tmp)
        pointer = {"path": str(target), "sha256": digest, "metric": metric, "gain": gain,
                   "tuned": tuned, "params_sha256": params.digest()}
        write_json(paths.LATEST, pointer)
        decision["reason"] = f"{metric} gain {gain:+.4f} >= {threshold}: promoted to {target}"
    else:
        decision["reason"] = (f"{metric} gain {gain:+.4f} < {threshold}: not promoted; "
                              "the previously promoted model stays current")
    current = latest()
    decision["latest"] = current["path"] if current else None
    write_json(paths.METRICS["promote"], decision)
    log.info(decision["reason"])
    return decision
