"""The general-capability check: EleutherAI's lm-evaluation-harness on the base and on the
tuned model, side by side, so that a fine-tune which gains on its task but forgets what the
base knew (catastrophic forgetting) shows up, and promote.max_regression can refuse it.

evaluate runs it when `evaluate.lm_eval_tasks` lists tasks: once on the base it has loaded
(quantized as in training) and once on the same weights with the adapter attached, each
wrapped in the harness's own Hugging Face model class (`HFLM(pretrained=<loaded model>)`),
so the harness scores exactly the two models evaluate's task metric scores. A task is a
harness task or group name (e.g. `hellaswag`, `arc_easy`; data from the Hugging Face Hub) or
the path of a task YAML under data/lm_eval/ in the harness's own format (local data:
data/lm_eval/smoke_mc.yaml). Writes metrics/lm_eval.json; with no tasks it records that the
check is off. `lm_eval` is imported only when tasks are listed (it takes seconds).

    finetune evaluate        # with evaluate.lm_eval_tasks: [data/lm_eval/smoke_mc.yaml]
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tasks.config import Params
from tasks.errors import PipelineError
from tasks.io import write_json
from tasks.workspace import Workspace

log = logging.getLogger("finetune.harness")

STDERR = "_stderr"  # the harness's suffix for a metric's standard error


def is_path(spec: str) -> bool:
    """A task YAML of the repository (else a name the harness knows)."""
    return spec.endswith((".yaml", ".yml"))


def settings(params: Params) -> dict[str, Any]:
    """What decides the scores besides the models: promote checks metrics/lm_eval.json was
    made with the current ones."""
    cfg = params.evaluate
    return {"tasks": cfg.lm_eval_tasks, "limit": cfg.lm_eval_limit, "num_fewshot": cfg.lm_eval_num_fewshot}


def _task_names(specs: list[str]) -> dict[str, str]:
    """{spec: the harness's name for it}: a YAML's `task` (or `group`), else the spec."""
    from lm_eval.tasks._index import TaskIndex

    names = {}
    for spec in specs:
        if not is_path(spec):
            names[spec] = spec
            continue
        if not Path(spec).is_file():
            raise PipelineError(f"evaluate.lm_eval_tasks: {spec!r}: no such file")
        entry = TaskIndex.entry_from_path(Path(spec))
        if entry is None:
            raise PipelineError(f"evaluate.lm_eval_tasks: {spec!r} names no `task` or `group`")
        names[spec] = entry.name
    return names


def _task_manager(specs: list[str]):
    from lm_eval.tasks import TaskManager

    # Indexing the harness's built-in task configs (~15,000 YAMLs) takes ~20 s on 2 cores:
    # skipped when only the repository's own YAMLs are listed.
    manager = TaskManager(include_defaults=not all(is_path(s) for s in specs))
    unknown = [s for s in specs if not is_path(s) and s not in manager.all_tasks]
    if unknown:
        raise PipelineError(f"evaluate.lm_eval_tasks: {', '.join(map(repr, unknown))} is not a task, "
                            "group or tag of lm-evaluation-harness (`lm-eval ls tasks` lists them) "
                            "nor a task YAML path")
    return manager


def _main_metric(result: dict[str, Any]) -> tuple[str, float, float | None]:
    """(name, value, stderr) of a task's main metric: its first, as the task lists them
    (e.g. 'acc,none': metric acc after the filter none)."""
    for key, value in result.items():
        metric, _, _ = key.partition(",")
        if "," in key and not metric.endswith(STDERR) and isinstance(value, int | float):
            err = result.get(key.replace(",", f"{STDERR},", 1))
            return key, float(value), float(err) if isinstance(err, int | float) else None
    raise PipelineError(f"lm-evaluation-harness reported no numeric metric: {sorted(result)}")


def score(model, tokenizer, params: Params) -> dict[str, dict[str, Any]]:
    """{spec: {task, metric, higher_is_better, num_examples, value, stderr}} of `model`."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    cfg = params.evaluate
    specs = cfg.lm_eval_tasks
    names = _task_names(specs)
    started = time.monotonic()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.per_device_eval_batch_size)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=specs, task_manager=_task_manager(specs), limit=cfg.lm_eval_limit,
        num_fewshot=cfg.lm_eval_num_fewshot, bootstrap_iters=cfg.bootstrap_samples,
        log_samples=False)
    scores = {}
    for spec, name in names.items():
        metric, value, err = _main_metric(out["results"][name])
        better = out.get("higher_is_better", {}).get(name, {}).get(metric.partition(",")[0], True)
        samples = out.get("n-samples", {}).get(name, {}).get("effective")
        scores[spec] = {"task": name, "metric": metric, "higher_is_better": bool(better),
                        "num_examples": samples, "value": round(value, 6),
                        "stderr": None if err is None else round(err, 6)}
    log.info("lm-evaluation-harness: %d task(s) in %.1f s", len(specs), time.monotonic() - started)
    return scores


def drop(row: dict[str, Any]) -> float:
    """How much worse tuned is than base on a task (negative: better), whatever the metric's
    direction."""
    gain = row["tuned"] - row["base"]
    return round(-gain if row["higher_is_better"] else gain, 6)


def write(params: Params, ws: Workspace, base: dict[str, dict[str, Any]] | None,
          tuned: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """metrics/lm_eval.json: per task its main metric for base and tuned, delta and drop."""
    result: dict[str, Any] = {"enabled": bool(params.evaluate.lm_eval_tasks), **settings(params), "scores": {}}
    if base is not None and tuned is not None:
        from importlib.metadata import version

        result["lm_eval_version"] = version("lm_eval")
        for spec, b in base.items():
            t = tuned[spec]
            row = {"task": b["task"], "metric": b["metric"], "higher_is_better": b["higher_is_better"],
                   "num_examples": b["num_examples"], "base": b["value"], "tuned": t["value"],
                   "delta": round(t["value"] - b["value"], 6),
                   "base_stderr": b["stderr"], "tuned_stderr": t["stderr"]}
            row["drop"] = drop(row)
            result["scores"][b["task"]] = row | {"spec": spec}
    write_json(ws.metrics("lm_eval"), result)
    return result
