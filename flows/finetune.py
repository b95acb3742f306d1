"""The Prefect flow `finetune`: the stages of dvc.yaml, in DVC's order, one Prefect task each.

DVC owns the graph, the cache and dvc.lock; each task runs `dvc repro --single-item STAGE`,
so a flow run and a `dvc repro` do the same work and write the same dvc.lock. Prefect adds
schedules, retries, logs, the UI's artifacts (ROUGE table, sample predictions, the exported
model) and work pools.

    python -m flows.finetune                       # one local run
    prefect deployment run finetune/nightly        # through a worker (see prefect.yaml)
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Completed, State

from tasks import paths
from tasks.config import ParamsOverride, apply_overrides

# Retries where failures can be transient (a preempted GPU host, a flaky filesystem).
# A stage that fails with the pipeline's own error (a user-fixable problem) is not retried.
RETRIES: dict[str, int] = {"train": 2}
RETRY_DELAY_SECONDS = [30, 120]
USER_ERROR_EXIT = 2  # tasks.cli exits 2 for errors the user can fix
TAIL_LINES = 40  # lines of a failed stage's output quoted in the error


class StageFailed(RuntimeError):
    def __init__(self, stage: str, user_error: bool, tail: str):
        self.user_error = user_error
        super().__init__(f"stage {stage!r} failed:\n{tail}")


def dvc_stages(root: Path = Path(".")) -> list[str]:
    """The stages of dvc.yaml in the order `dvc repro` runs them (dependencies first,
    otherwise the order of dvc.yaml)."""
    import networkx as nx
    from dvc.repo import Repo

    declared = list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])
    with Repo(str(root)) as repo:
        graph = repo.index.graph.reverse()  # edges: dependency -> dependent
        names = {s: s.name for s in graph.nodes}
        order = nx.lexicographical_topological_sort(graph, key=lambda s: declared.index(names[s]))
        return [names[s] for s in order]


def stage_version(stage: str, root: Path = Path(".")) -> str | None:
    """DVC's own version of a stage: a hash of its command, dependency hashes and params as
    recorded in dvc.lock."""
    lock_file = root / "dvc.lock"
    if not lock_file.is_file():
        return None
    entry = (yaml.safe_load(lock_file.read_text()) or {}).get("stages", {}).get(stage)
    if entry is None:
        return None
    entry = {k: v for k, v in entry.items() if k != "outs"}
    return hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:12]


def _retry_unless_user_error(task, task_run, state) -> bool:
    try:
        state.result()
    except StageFailed as err:
        return not err.user_error
    except Exception:
        return True
    return False


@task(log_prints=True)
def run_stage(stage: str, force: bool = False) -> dict[str, Any] | State:
    """`dvc repro --single-item STAGE`, its output streamed to the task's log."""
    logger = get_run_logger()
    cmd = ["dvc", "repro", "--single-item", stage, *(["--force"] if force else [])]
    logger.info("$ %s", " ".join(cmd))
    # The stage commands (`finetune ...`) live beside this interpreter, which a worker may
    # have started without activating the venv; progress bars would flood the UI log.
    env = {**os.environ, "TQDM_DISABLE": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    # Own process group: cancelling the flow must stop the stage's process too, not only dvc.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    skipped = False
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                logger.info(line)
                tail.append(line)
            # Up to date, or restored from DVC's run cache after its outputs went missing.
            skipped |= f"Stage '{stage}' didn't change, skipping" in line \
                or f"Stage '{stage}' is cached - skipping run" in line
        code = proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
    if code != 0:
        text = "\n".join(tail)
        raise StageFailed(stage, f"exited with {USER_ERROR_EXIT}" in text, text)
    result = {"stage": stage, "status": "skipped" if skipped else "ran",
              "version": stage_version(stage)}
    if skipped:
        return Completed(message=f"{stage} is up to date: no work done", name="Skipped", data=result)
    return result


def _rouge_rows(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"metric": t, "base": evaluation["base"][t]["mean"], "tuned": evaluation["tuned"][t]["mean"],
             "delta": evaluation["delta"][t],
             "tuned_ci95": f"[{evaluation['tuned'][t]['ci_low']}, {evaluation['tuned'][t]['ci_high']}]"}
            for t in evaluation["delta"]]


def publish(stage: str) -> dict[str, Any]:
    """UI artifacts for a finished stage; stable keys so runs compare over time."""
    if stage == "evaluate":
        evaluation = json.loads(paths.METRICS["eval"].read_text())
        rows = _rouge_rows(evaluation)
        create_table_artifact(key="rouge-base-vs-tuned", table=rows,
                              description="ROUGE F-measure on the test split, base vs tuned")
        create_markdown_artifact(key="sample-predictions", markdown=paths.EVAL_PREVIEW.read_text(),
                                 description="A few test examples: reference, base, tuned")
        return {"rouge": {r["metric"]: {k: r[k] for k in ("base", "tuned", "delta")} for r in rows}}
    if stage == "export":
        lock = yaml.safe_load(Path("dvc.lock").read_text())["stages"]
        md5 = {o["path"]: o["md5"] for s in ("train", "export") for o in lock[s]["outs"]}
        lines = ["| artifact | path | md5 (dvc.lock) |", "|---|---|---|",
                 f"| merged model | `{paths.MERGED}` | `{md5[str(paths.MERGED)]}` |",
                 f"| adapter | `{paths.ADAPTER}` | `{md5[str(paths.ADAPTER)]}` |"]
        create_markdown_artifact(key="exported-model", markdown="\n".join(lines) + "\n",
                                 description="Where the merged model and adapter are")
        return {"model": str(paths.MERGED), "model_md5": md5[str(paths.MERGED)]}
    if stage == "promote":
        decision = json.loads(paths.METRICS["promote"].read_text())
        verdict = "PROMOTED" if decision["promoted"] else "NOT PROMOTED"
        create_markdown_artifact(key="promotion", markdown=f"**{verdict}**: {decision['reason']}\n\n"
                                 f"Current model: `{decision['latest']}`\n",
                                 description="The promotion gate's decision")
        return {"promoted": decision["promoted"], "promotion": decision["reason"],
                "latest": decision["latest"]}
    return {}


@flow(name="finetune", log_prints=True)
def finetune(overrides: ParamsOverride | None = None, force: bool = False) -> dict[str, Any]:
    """Run the fine-tuning pipeline of dvc.yaml.

    Args:
        overrides: values to change in params.yaml before running (validated like params.yaml;
            written to it, as `dvc exp run -S` does).
        force: rerun every stage even when DVC finds it up to date.
    """
    logger = get_run_logger()
    if overrides is not None:
        changed = apply_overrides(Path("params.yaml"), overrides)
        logger.info("params.yaml overrides: %s", changed)
    summary: dict[str, Any] = {"stages": {}}
    for stage in dvc_stages():
        options: dict[str, Any] = {"name": stage, "task_run_name": stage}
        if RETRIES.get(stage):
            options.update(retries=RETRIES[stage], retry_delay_seconds=RETRY_DELAY_SECONDS,
                           retry_condition_fn=_retry_unless_user_error)
        state = run_stage.with_options(**options)(stage, force, return_state=True)
        result = state.result()  # raises the stage's error, failing the flow run
        summary["stages"][stage] = {k: result[k] for k in ("status", "version")}
        summary.update(publish(stage))
    if summary.get("promoted") is False:
        logger.warning("not promoted: %s", summary["promotion"])
    return summary


if __name__ == "__main__":
    print(json.dumps(finetune(), indent=2))
