"""The Prefect flow `finetune`: the stages of dvc.yaml, in DVC's order, one Prefect task each.

DVC owns the graph, the cache and dvc.lock. A local run starts one `dvc repro --single-item
STAGE ...` for its stages (SharedRepro) and each stage's task follows that stage's part of it,
so a flow run and a `dvc repro` do the same work and write the same dvc.lock. Prefect adds
schedules, retries, logs, the UI's artifacts (ROUGE table, sample predictions, the exported
model) and work pools.

Across machines, DVC's default remote is the artifact exchange: with `remote`, each task
restores its inputs from the remote's run cache and pushes its outputs. With
`gpu_deployment`, the train stage runs as the `finetune-stage` flow on another work pool (in
another checkout), and this run then restores train's result from the remote and goes on.

    python -m flows.finetune                       # one local run
    prefect deployment run finetune/nightly        # through a worker (see prefect.yaml)
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import yaml
from prefect import flow, get_run_logger, task
from prefect.input import RunInput
from pydantic import BaseModel, Field
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                                update_progress_artifact)
from prefect.states import Completed, State

from tasks.config import ParamsOverride, apply_overrides, deep_merge, load_params, parse_params, read_yaml
from tasks.errors import PipelineError
from tasks.nodes import (NODE_STORAGE_ENV, RDZV_ENDPOINT_ENV, RDZV_ID_ENV, RDZV_TIMEOUT_ENV, rendezvous_timeout,
                         split_endpoint)
from tasks.promote import PENDING
from tasks.stages import STAGES
from tasks.workspace import RESTORE_ONLY_ENV, Workspace

# Retries where failures can be transient (a preempted GPU host, a flaky filesystem).
# A stage that fails with the pipeline's own error (a user-fixable problem) is not retried.
RETRIES: dict[str, int] = {"train": 2}
RETRY_DELAY_SECONDS = [30, 120]
USER_ERROR_EXIT = 2  # tasks.cli exits 2 for errors the user can fix
TAIL_LINES = 40  # lines of a failed stage's output quoted in the error
DEFAULT_GPU_STAGES = ("train",)  # what a split run sends to the GPU pool by default
# A sweep compares its points on the test split: each experiment runs up to evaluate; export
# and promote the best one with `dvc exp apply NAME && dvc repro`.
SWEEP_TARGET = "evaluate"
NODE_POLL_S = 2.0  # how often a multi-node stage's node runs are read (_on_nodes)
NOT_STARTED = ("SCHEDULED", "PENDING")  # the states of a node run no worker has started yet
PROGRESS_POLL_S = 3.0  # how often train's progress artifacts are refreshed while it runs
LOCK_REREAD_S = 0.05  # dvc.lock is read twice this far apart (read_lock)
LOCK_READS = 100  # reads before read_lock gives up (5 s)
CHECKOUT_VENV = Path(".venv")  # the environment `make setup` builds in a checkout
APPROVAL_TIMEOUT_S = 24 * 3600  # how long a promotion awaiting approval holds the run (a day)
APPROVAL_POLL_S = 2  # how often the paused run asks the API whether it was answered
NOTIFY_VARIABLE = "finetune_notify_block"  # a Prefect variable naming the notification block


class StageFailed(RuntimeError):
    def __init__(self, stage: str, user_error: bool, tail: str):
        self.stage = stage
        self.user_error = user_error
        super().__init__(f"stage {stage!r} failed:\n{tail}")

    def summary(self) -> str:
        """One line: the stage and its own error line (`finetune <stage>: error: ...`), else
        the last line it printed; the whole output is in the run's log above."""
        return f"stage {self.stage!r} failed ({error_line(str(self).partition(chr(10))[2])}); " \
            "its output is in the log above"


def error_line(output: str) -> str:
    """The line of a stage's output that says what went wrong: its own error line
    (`finetune <stage>: error: ...`), else the last line."""
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if ": error: " in line]
    return (errors or lines or ["no output"])[-1].strip()


def read_lock(root: Path = Path("."), need: tuple[str, ...] = ()) -> dict[str, Any]:
    """dvc.lock's stages ({} before the first run). In a local run, DVC may be rewriting the
    file for a later stage while a task reads it (it truncates, then writes: SharedRepro), so
    a read counts once it parses, holds the `need`ed stages and a second read LOCK_REREAD_S
    later gives the same text; a text read complete before counts at once (a run in which
    DVC skips a stage leaves the file as it was)."""
    path = root / "dvc.lock"
    previous = None
    for _ in range(LOCK_READS):
        text = path.read_text() if path.is_file() else ""
        stages = _COMPLETE_LOCKS.get(text)
        if stages is None and text == previous and (stages := _lock_stages(text)) is not None:
            _COMPLETE_LOCKS[text] = stages
            while len(_COMPLETE_LOCKS) > LOCK_TEXTS_KEPT:
                del _COMPLETE_LOCKS[next(iter(_COMPLETE_LOCKS))]
        if stages is not None and all(s in stages for s in need):
            return stages
        previous = text
        time.sleep(LOCK_REREAD_S)
    raise RuntimeError(f"{path}: no complete copy (with stages {', '.join(need) or 'any'}) in "
                       f"{LOCK_READS} reads: is another `dvc repro` writing it?")


# dvc.lock texts read complete (stable across two reads) and their stages, oldest first:
# shared by the reads of one run, so each text is parsed once (callers read, never change it).
_COMPLETE_LOCKS: dict[str, dict[str, Any]] = {}
LOCK_TEXTS_KEPT = 4


def _lock_stages(text: str) -> dict[str, Any] | None:
    """The stages of a dvc.lock text; None when it does not parse (cut mid-write). LibYAML's
    parser where PyYAML has it: a 500-line lock takes 7 ms there, 50 ms in pure Python, and
    the flow reads it once per stage."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        return (yaml.load(text, Loader=loader) or {}).get("stages") or {}
    except (yaml.YAMLError, AttributeError):
        return None


def stage_version(stage: str, root: Path = Path(".")) -> str | None:
    """DVC's own version of a stage: a hash of its command, dependency hashes and params as
    recorded in dvc.lock."""
    entry = read_lock(root).get(stage)
    if entry is None:
        return None
    entry = {k: v for k, v in entry.items() if k != "outs"}
    return hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:12]


def stage_bin(root: Path = Path(".")) -> Path:
    """Where the stage commands (`dvc`, `finetune ...`) come from: the checkout's own
    environment (`make setup`'s .venv) when it has one, so a run in a checkout a pull step
    cloned and installed runs that commit's code with that commit's lock; else beside this
    interpreter, which a worker may have started without activating the venv."""
    venv_bin = (root / CHECKOUT_VENV / "bin").absolute()
    return venv_bin if (venv_bin / "finetune").is_file() else Path(sys.executable).parent


def _stage_env() -> dict[str, str]:
    # Progress bars would flood the UI log.
    return {**os.environ, "TQDM_DISABLE": "1",
            "PATH": os.pathsep.join([str(stage_bin()), os.environ.get("PATH", "")])}


def _retry_unless_user_error(task, task_run, state) -> bool:
    try:
        state.result()
    except StageFailed as err:
        return not err.user_error
    except Exception:
        return True
    return False


def upstream(stage: str, root: Path = Path(".")) -> list[str]:
    """The stages whose outputs `stage` reads (direct dependencies in DVC's graph)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges: dependent -> dependency
        [node] = [s for s in graph.nodes if s.name == stage]
        return sorted(s.name for s in graph.successors(node))


def _stream(cmd: list[str], env: dict[str, str], stage: str) -> tuple[int, str, bool]:
    """Runs `cmd` in its own process group with its output in the task log; returns the exit
    code, the output's tail and whether DVC skipped `stage` (up to date or restored)."""
    logger = get_run_logger()
    logger.info("$ %s", " ".join(cmd))
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
    return code, "\n".join(tail), skipped


class TrainProgress:
    """Relays the train stage's reports/progress.json (rewritten by its own process, which
    knows nothing of Prefect) to a progress artifact (step / max_steps) and a table artifact
    (latest loss, learning rate, validation loss, tokens/s, ETA) while the stage runs, and once
    more at the end."""

    def __init__(self, ws: Workspace, fresh: bool = True) -> None:
        self.ws = ws
        self.fresh = fresh
        self.artifact_id: Any = None
        self.seen: dict[str, Any] | None = None
        self.stop = threading.Event()
        # The thread needs the task run's context for its artifacts to belong to this run.
        self.thread = threading.Thread(target=contextvars.copy_context().run, args=(self._poll,),
                                       daemon=True)

    def __enter__(self) -> TrainProgress:
        if self.fresh:
            self.ws.progress.unlink(missing_ok=True)  # an earlier run's position is not this one's
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.relay()

    def _poll(self) -> None:
        while not self.stop.wait(PROGRESS_POLL_S):
            self.relay()

    def relay(self) -> None:
        try:
            progress = json.loads(self.ws.progress.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return  # not started yet (or skipped by DVC)
        if progress == self.seen:
            return
        self.seen = progress
        description = f"train: step {progress['step']} of {progress['max_steps']}"
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(progress["percent"], key="train-progress",
                                                        description=description)
        else:
            update_progress_artifact(self.artifact_id, progress["percent"], description=description)
        eta = progress.get("eta_seconds")
        row = {"step": progress["step"], "max_steps": progress["max_steps"],
               "loss": progress.get("loss"), "learning_rate": progress.get("learning_rate"),
               "tokens_per_second": progress.get("tokens_per_second"),
               "eval_loss": progress.get("eval_loss"),  # the latest validation loss (train.eval_steps)
               "eta": str(timedelta(seconds=round(eta))) if eta is not None else None}
        create_table_artifact(key="train-status", table=[row], description="train: latest step")


# DVC's first line about a stage in `dvc repro`'s output: it runs, or finds it up to date, or
# restores it from the run cache.
STAGE_LINE = re.compile(r"^(?:Running stage '([^']+)':|Stage '([^']+)' (?:didn't change, skipping"
                        r"|is cached - skipping run))")


class SharedRepro:
    """One `dvc repro --single-item [--force] STAGE ...` process for the stages a local flow
    run has still to run, in the flow's order: one DVC start-up and index load per run instead
    of one per stage (0.7-0.8 s each, BENCHMARKS.md). DVC runs explicit targets in the order
    given and stops at the first failure, as the flow does. Each stage's task follows the
    output from DVC's first line about its stage to its first line about the next one; by then
    DVC has written the stage's dvc.lock entry. A failed stage ends the process: its retry (or
    the next flow run) starts a new one from that stage."""

    def __init__(self, stages: list[str], force: bool, env: dict[str, str]) -> None:
        self.cmd = ["dvc", "repro", "--single-item", *(["--force"] if force else []), *stages]
        self.pending = list(stages)
        self.carried: str | None = None  # the line that began the next stage's part
        if "train" in stages:  # train's task may start after train did: clear the old position now
            Workspace.from_env().progress.unlink(missing_ok=True)
        # Own process group: cancelling the flow must stop the stage's process too, not only dvc.
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env, start_new_session=True)

    def next_stage(self) -> str | None:
        return self.pending[0] if self.pending and (self.proc.poll() is None or self.carried) else None

    def follow(self, stage: str) -> tuple[int, str, bool]:
        """The exit code for `stage` (0 once DVC moved on to the next stage), its output's
        tail and whether DVC skipped it; its lines go to the task's log."""
        assert self.pending[:1] == [stage], (stage, self.pending)
        self.pending.pop(0)
        logger = get_run_logger()
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        skipped = False
        assert self.proc.stdout is not None
        lines = itertools.chain([self.carried] if self.carried else [], self.proc.stdout)
        self.carried = None
        try:
            for raw in lines:
                line = raw.rstrip()
                if (found := STAGE_LINE.match(line)) and (found.group(1) or found.group(2)) != stage:
                    self.carried = raw
                    return 0, "\n".join(tail), skipped
                if line:
                    logger.info(line)
                    tail.append(line)
                skipped |= bool(found and found.group(2))
            return self.proc.wait(), "\n".join(tail), skipped
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait()


# flow run id -> its SharedRepro (tasks of one local flow run follow the same process).
_SHARED: dict[Any, SharedRepro] = {}


def _shared_repro(stage: str, force: bool, env: dict[str, str]) -> tuple[Any, SharedRepro]:
    from prefect.context import get_run_context

    key = get_run_context().task_run.flow_run_id
    shared = _SHARED.get(key)
    if shared is None or shared.next_stage() != stage:
        if shared is not None:
            shared.stop()
        names = list(STAGES)
        shared = _SHARED[key] = SharedRepro(names[names.index(stage):], force, env)
        get_run_logger().info("$ %s", " ".join(shared.cmd))
    return key, shared


@task(log_prints=True)
def run_stage(stage: str, force: bool = False, remote: bool = False,
              restore_only: bool = False) -> dict[str, Any] | State:
    """The stage run by DVC, its output streamed to the task's log: locally, its part of the
    run's one `dvc repro` process (SharedRepro); with `remote`, `dvc repro --single-item STAGE`.

    With `remote`, DVC's default remote is the artifact exchange between machines: the
    stage's inputs are first restored (`dvc repro --pull` of the stages it reads, from the
    run cache another worker pushed), and its outputs and run-cache entry are pushed after.
    `restore_only` takes the stage's result from the remote and refuses to compute it here."""
    env = _stage_env()
    if not remote and not restore_only:
        key, shared = _shared_repro(stage, force, env)
        with TrainProgress(Workspace.from_env(), fresh=False) if stage == "train" else contextlib.nullcontext():
            code, tail, skipped = shared.follow(stage)
        if shared.next_stage() is None:
            del _SHARED[key]  # done, or failed: a retry starts its own
        if code != 0:
            raise StageFailed(stage, f"exited with {USER_ERROR_EXIT}" in tail, tail)
        return _stage_result(stage, skipped, restore_only)
    commands = []
    if remote and (inputs := upstream(stage)):
        commands.append((["dvc", "repro", "--pull", *inputs], env))
    repro = ["dvc", "repro", "--single-item", stage, *(["--pull"] if remote else []),
             *(["--force"] if force and not restore_only else [])]
    commands.append((repro, {**env, RESTORE_ONLY_ENV: stage} if restore_only else env))
    if remote and not restore_only:
        commands.append((["dvc", "push", "--run-cache", stage], env))
    skipped = False
    for cmd, cmd_env in commands:
        if cmd is repro and stage == "train" and not restore_only:
            with TrainProgress(Workspace.from_env()):
                code, tail, skipped_now = _stream(cmd, cmd_env, stage)
        else:
            code, tail, skipped_now = _stream(cmd, cmd_env, stage)
        if code != 0:
            raise StageFailed(stage, f"exited with {USER_ERROR_EXIT}" in tail, tail)
        skipped |= cmd is repro and skipped_now
    return _stage_result(stage, skipped, restore_only)


def _stage_result(stage: str, skipped: bool, restore_only: bool) -> dict[str, Any] | State:
    result = {"stage": stage, "status": "skipped" if skipped else "ran",
              "version": stage_version(stage)}
    if skipped:
        how = "restored from the remote" if restore_only else "up to date"
        return Completed(message=f"{stage} is {how}: no work done here", name="Skipped", data=result)
    return result


def _score_rows(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"metric": t, "base": evaluation["base"][t]["mean"], "tuned": evaluation["tuned"][t]["mean"],
             "delta": evaluation["delta"][t],
             "tuned_ci95": f"[{evaluation['tuned'][t]['ci_low']}, {evaluation['tuned'][t]['ci_high']}]"}
            for t in evaluation["delta"]]


def publish(stage: str) -> dict[str, Any]:
    """UI artifacts for a finished stage; stable keys so runs compare over time."""
    ws = Workspace.from_env()
    if stage == "prepare":
        leakage = json.loads(ws.metrics("prepare").read_text())["leakage"]
        rows = [{"kind": kind, **leakage[kind]} for kind in ("exact", "normalized", "near")]
        create_table_artifact(key="data-leakage", table=rows,
                              description=f"Held-out rows repeating an earlier split's prompt "
                                          f"({leakage['dropped']} dropped; near: Jaccard >= "
                                          f"{leakage['threshold']})")
        return {"leakage": leakage["rows"]}
    if stage == "align":
        alignment = json.loads(ws.metrics("align").read_text())
        if not alignment["enabled"]:
            return {}
        held_out = alignment["held_out"]
        if alignment["method"] == "grpo":  # the greedy answers' rewards, SFT model against aligned
            rows = [{"metric": k, "sft": v, "aligned": held_out["aligned"][k]} for k, v in held_out["sft"].items()]
        else:
            rows = [{"metric": k, "held_out": v} for k, v in held_out.items()]
        create_table_artifact(key="preference-alignment", table=rows,
                              description=f"{alignment['method'].upper()}: the held-out metrics of "
                                          "metrics/align.json")
        return {"alignment": alignment["held_out"]}
    if stage == "evaluate":
        evaluation = json.loads(ws.metrics("eval").read_text())
        rows = _score_rows(evaluation)
        # The task's metrics: ROUGE F-measures, or accuracy and macro-F1 for classification.
        create_table_artifact(key="scores-base-vs-tuned", table=rows,
                              description="Test-split scores, base vs tuned")
        create_markdown_artifact(key="sample-predictions", markdown=ws.eval_preview.read_text(),
                                 description="A few test examples: reference, base, tuned")
        summary: dict[str, Any] = {"scores": {r["metric"]: {k: r[k] for k in ("base", "tuned", "delta")}
                                              for r in rows}}
        capability = json.loads(ws.metrics("lm_eval").read_text())["scores"]
        if capability:  # evaluate.lm_eval_tasks listed
            create_table_artifact(key="general-capability", table=[
                {"task": name, **{k: row[k] for k in ("metric", "base", "tuned", "drop", "num_examples")}}
                for name, row in capability.items()],
                description="lm-evaluation-harness, base vs tuned (drop: how much worse tuned is)")
            summary["lm_eval"] = {name: {k: row[k] for k in ("base", "tuned", "drop")}
                                  for name, row in capability.items()}
        return summary
    if stage == "export":
        lock = read_lock(need=("train", "export"))
        md5 = {o["path"]: o["md5"] for s in ("train", "export") for o in lock[s]["outs"]}
        lines = ["| artifact | path | md5 (dvc.lock) |", "|---|---|---|",
                 f"| merged model | `{ws.merged}` | `{md5[str(ws.merged)]}` |",
                 f"| adapter | `{ws.adapter}` | `{md5[str(ws.adapter)]}` |"]
        create_markdown_artifact(key="exported-model", markdown="\n".join(lines) + "\n",
                                 description="Where the merged model and adapter are")
        return {"model": str(ws.merged), "model_md5": md5[str(ws.merged)]}
    if stage == "promote":
        decision = json.loads(ws.metrics("promote").read_text())
        create_markdown_artifact(key="promotion", markdown=promotion_markdown(decision),
                                 description="The promotion gate: challenger vs champion")
        return {"promoted": decision["promoted"], "promotion": decision["reason"],
                "latest": decision["latest"],
                **({"approval": decision["approval"]["status"]} if "approval" in decision else {})}
    return {}


def promotion_markdown(decision: dict[str, Any]) -> str:
    """metrics/promote.json for people: the verdict, the scores, the capability drops and the
    serve check's differing answers."""
    approval = decision.get("approval", {}).get("status")
    verdict = "PROMOTED" if decision["promoted"] else \
        "AWAITING APPROVAL" if approval == PENDING else "NOT PROMOTED"
    champion, challenger, d = decision["champion"], decision["challenger"], decision["difference"]
    table = (f"| | model | {decision['metric']} |\n|---|---|---|\n"
             f"| champion | `{champion['model']}` ({champion['predictions']}) | {champion['score']} |\n"
             f"| challenger | `{challenger['model']}` | {challenger['score']} |\n"
             f"| difference | {decision['confidence_level']:.0%} CI [{d['ci_low']}, {d['ci_high']}] "
             f"| {d['mean']} |\n")
    check = decision.get("lm_eval")
    if check is not None and check["max_regression"] is not None:
        table += "".join(f"| {name} ({row['metric']}) | drop from the base "
                         f"{'> ' if name in check['regressed'] else '<= '}"
                         f"max_regression {check['max_regression']} | {row['drop']} |\n"
                         for name, row in check["tasks"].items())
    served = decision.get("serve_check")
    if served is not None:
        table += f"\nServe check: {served['rows'] - len(served['differing'])} of {served['rows']} served answers " \
                 "equal evaluate's tuned predictions.\n"
        if served["differing"]:
            table += "\n| id | expected (evaluate) | served |\n|---|---|---|\n" + "".join(
                f"| {row['id']} | {_cell(row['expected'])} | {_cell(row['served'])} |\n" for row in served["differing"])
    return f"**{verdict}**: {decision['reason']}\n\n{table}\nCurrent model: `{decision['latest']}`\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _stage_options(stage: str) -> dict[str, Any]:
    options: dict[str, Any] = {"name": stage, "task_run_name": stage}
    if RETRIES.get(stage):
        options.update(retries=RETRIES[stage], retry_delay_seconds=RETRY_DELAY_SECONDS,
                       retry_condition_fn=_retry_unless_user_error)
    return options


def _apply(overrides: ParamsOverride | None) -> None:
    if overrides is not None:
        changed = apply_overrides(Path("params.yaml"), overrides)
        get_run_logger().info("params.yaml overrides: %s", changed)


def _on_other_pool(deployment: str, stage: str, force: bool,
                   overrides: ParamsOverride | None) -> str:
    """Runs `stage` through the `finetune-stage` deployment `deployment` (another work pool,
    another checkout) and waits for it; train with train.num_nodes > 1 runs once per node
    (_on_nodes). Returns where it ran, for the run's summary."""
    from prefect.deployments import run_deployment

    nodes = load_params().train.num_nodes if stage == "train" else 1
    if nodes > 1:
        _on_nodes(deployment, stage, nodes, _child_parameters(stage, force, overrides))
        return f"ran on {nodes} nodes of {deployment}"
    child = run_deployment(deployment, parameters=_child_parameters(stage, force, overrides), timeout=None)
    if not child.state or not child.state.is_completed():
        raise StageFailed(stage, False, f"{deployment} run {child.name} ended "
                          f"{child.state.name if child.state else 'without a state'}")
    return f"ran on {deployment}"


def _child_parameters(stage: str, force: bool, overrides: ParamsOverride | None) -> dict[str, Any]:
    parameters: dict[str, Any] = {"stage": stage, "force": force}
    if overrides is not None:
        parameters["overrides"] = overrides.model_dump(mode="json", exclude_unset=True)
    return parameters


class NodeMeeting(BaseModel):
    """Where the node runs of one multi-node stage meet: the c10d store the parent flow run
    hosts (hosted_rendezvous), passed to each `finetune-stage` run as FINETUNE_RDZV_*."""

    endpoint: str = Field(description="host:port of the c10d store (the parent run's machine)")
    run_id: str = Field(description="the rendezvous id, one per launch of the stage")
    timeout_s: float = Field(description="how long a node waits for the others to join")

    def environment(self) -> dict[str, str]:
        # Each worker has its own checkout: every node writes its outputs there and pushes them.
        return {RDZV_ENDPOINT_ENV: self.endpoint, RDZV_ID_ENV: self.run_id,
                RDZV_TIMEOUT_ENV: f"{self.timeout_s:g}", NODE_STORAGE_ENV: "local"}


@contextlib.contextmanager
def hosted_rendezvous(nodes: int, run_id: str) -> Iterator[NodeMeeting]:
    """A c10d store in this process, where the nodes' elastic agents meet. The flow run cannot
    know which hosts its pool's workers will be, so the meeting point is its own: host:port
    from FINETUNE_RDZV_ENDPOINT (an address of this machine the GPU hosts can reach), else
    this machine's name and a free port. An agent on this same machine finds the port taken
    and joins as a client."""
    import socket

    from torch.distributed import TCPStore

    try:
        endpoint = os.environ.get(RDZV_ENDPOINT_ENV)
        host, port = split_endpoint(endpoint, nodes) if endpoint else (socket.getfqdn(), 0)
        timeout_s = rendezvous_timeout()
    except PipelineError as err:
        raise SettingError(str(err)) from None
    store = TCPStore(host, port, is_master=True, wait_for_workers=False,
                     timeout=timedelta(seconds=timeout_s))
    try:
        yield NodeMeeting(endpoint=f"{host}:{store.port}", run_id=run_id, timeout_s=timeout_s)
    finally:
        del store  # the server thread stops with the store


def _on_nodes(deployment: str, stage: str, nodes: int, parameters: dict[str, Any]) -> None:
    """One `deployment` run per node, all meeting at this run's rendezvous; returns once every
    node completed. When one fails, the others are cancelled: those no worker had started by
    then would wait for a meeting that is over, the running ones stop on the lost peer by
    themselves within the rendezvous timeout (and are cancelled if they have not). The stage
    fails with the failed node's line and the count of node runs that had not started."""
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.runtime import flow_run

    logger = get_run_logger()
    with hosted_rendezvous(nodes, f"{stage}-{uuid.uuid4().hex[:12]}") as meeting:
        runs = [run_deployment(deployment, parameters={**parameters, "meeting": meeting.model_dump()},
                               flow_run_name=f"{flow_run.name}-{stage}-node-{i}", timeout=0)
                for i in range(nodes)]
        logger.info("%s: %d node runs of %s meeting at %s (id %s): %s", stage, nodes, deployment,
                    meeting.endpoint, meeting.run_id, ", ".join(r.name for r in runs))
        with get_client(sync_client=True) as client:
            runs = _until(client, runs, lambda rs: all(r.state.is_final() for r in rs)
                          or any(r.state.is_final() and not r.state.is_completed() for r in rs))
            failed = min((r for r in runs if r.state.is_final() and not r.state.is_completed()),
                         key=lambda r: r.end_time or r.state.timestamp, default=None)
            if failed is None:
                return
            # Whether a node had started is read from its start time, not from the state seen
            # now: a worker freed by the failed node may be taking another one at this moment.
            ended = failed.end_time or failed.state.timestamp
            late = [r for r in runs if r.id != failed.id and (r.start_time is None or r.start_time > ended)]
            _cancel(client, [r for r in late if not r.state.is_final()], failed.name)
            runs = _until(client, runs, lambda rs: all(r.state.is_final() for r in rs), meeting.timeout_s)
            _cancel(client, [r for r in runs if not r.state.is_final()], failed.name)
    line = error_line(failed.state.message or failed.state.name)
    if late:
        raise StageFailed(stage, False, f"train.num_nodes is {nodes}, but {len(late)} of the {nodes} "
                          f"{deployment} runs had not started when {failed.name} gave up (cancelled: "
                          f"{', '.join(r.name for r in late)}): its work pool needs {nodes} workers free at "
                          f"once, each started with `--limit 1`; {failed.name}: {line}")
    raise StageFailed(stage, False, f"{failed.name} ended {failed.state.name}: {line}")


def _cancel(client: Any, runs: list[Any], failed: str) -> None:
    """Cancels node runs: one no worker has started at once, a running one through its worker
    (Cancelling: the worker stops its process)."""
    from prefect.states import Cancelled, Cancelling

    for r in runs:
        state = Cancelled if r.state.type.value in NOT_STARTED else Cancelling
        client.set_flow_run_state(r.id, state(message=f"node run {failed} failed: the meeting is over"),
                                  force=True)


def _until(client: Any, runs: list[Any], done: Any, timeout_s: float | None = None) -> list[Any]:
    """`runs` re-read every NODE_POLL_S until `done(runs)` holds or `timeout_s` passed."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        runs = [client.read_flow_run(r.id) for r in runs]
        if done(runs) or (deadline is not None and time.monotonic() > deadline):
            return runs
        time.sleep(NODE_POLL_S)


def _nested(dotted: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def sweep_points(grid: dict[str, list[Any]], params_file: Path = Path("params.yaml")) -> list[dict[str, Any]]:
    """Every point of `grid` (dotted params.yaml key -> values), in the order of its keys and
    values; each point is checked merged into `params_file`, so a bad key or value fails the
    sweep before any experiment runs."""
    problems = [f"sweep: {key}: needs a non-empty list of values" for key, values in grid.items()
                if not isinstance(values, list) or not values]
    if problems or not grid:
        raise ValueError("\n".join(problems or ["sweep: the grid names no params"]))
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    base = read_yaml(params_file)
    for point in points:
        parse_params(deep_merge(base, _nested(point)), f"{params_file} with sweep point {point}")
    return points


@task(log_prints=True)
def experiment(name: str, point: dict[str, Any], metric: str, force: bool = False) -> dict[str, Any]:
    """One sweep point as a DVC experiment: `dvc exp run -n NAME -S KEY=VALUE ... evaluate`,
    which leaves its results in the workspace; returns its row of the sweep table."""
    ws = Workspace.from_env()
    cmd = ["dvc", "exp", "run", "-n", name, *(["--force"] if force else []),
           *[a for key, value in point.items() for a in ("-S", f"{key}={json.dumps(value)}")], SWEEP_TARGET]
    started = time.monotonic()
    code, tail, _ = _stream(cmd, _stage_env(), SWEEP_TARGET)
    if code != 0:
        raise StageFailed(SWEEP_TARGET, f"exited with {USER_ERROR_EXIT}" in tail, tail)
    wall = time.monotonic() - started
    tuned = json.loads(ws.metrics("eval").read_text())["tuned"][metric]
    train = json.loads(ws.metrics("train").read_text())
    return {"experiment": name, **point, metric: tuned["mean"],
            f"{metric}_ci95": f"[{tuned['ci_low']}, {tuned['ci_high']}]",
            "train_loss": train["train_loss"], "wall_time_s": round(wall, 1)}


def run_sweep(grid: dict[str, list[Any]], force: bool = False) -> dict[str, Any]:
    """Each point of `grid` as a DVC experiment, one after another in this checkout, and one
    table artifact (`sweep`) comparing them, the best (highest headline metric) marked."""
    from prefect.runtime import flow_run

    from tasks.scoring import HEADLINE

    points = sweep_points(grid)
    metric = HEADLINE[load_params().model.task]
    # Named after the flow run, so each row leads back to its experiment: `dvc exp apply NAME`.
    names = [f"{flow_run.name}-{i}" for i in range(1, len(points) + 1)]
    rows = [experiment.with_options(task_run_name=name)(name, point, metric, force)
            for name, point in zip(names, points)]
    best = max(rows, key=lambda r: r[metric])
    for row in rows:
        row["best"] = "best" if row is best else ""
    create_table_artifact(key="sweep", table=rows,
                          description=f"{len(rows)} DVC experiments up to {SWEEP_TARGET}, "
                                      f"best by tuned {metric} (95% CI); `dvc exp show` lists them")
    return {"sweep": rows, "best": best["experiment"]}


class Approval(RunInput):
    """A person's answer to a promotion awaiting approval (promote.approval: required)."""

    approve: bool = Field(description="true: apply the promotion (the challenger becomes the champion); "
                                      "false: reject it (the champion stays)")
    note: str = Field("", description="who decided and why; kept in metrics/promote.json")


def await_approval(timeout_s: int) -> dict[str, Any]:
    """Pauses the run until a person answers the approval form (the run's Resume button in
    the UI, or resume_flow_run with run_input); no answer within `timeout_s` rejects. The
    answer is applied by `finetune promote --approve|--reject`, as a DVC user would."""
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    decision = json.loads(Workspace.from_env().metrics("promote").read_text())
    form = Approval.with_initial_data(description=promotion_markdown(decision))
    get_run_logger().info("the promotion awaits approval: answer this run's form within %d s", timeout_s)
    try:
        answer = pause_flow_run(wait_for_input=form, timeout=timeout_s, poll_interval=APPROVAL_POLL_S,
                                key="approval")
        approve, note = answer.approve, answer.note
    except FlowPauseTimeout:
        approve, note = False, f"no answer within {timeout_s} s"
    cmd = ["finetune", "promote", "--approve" if approve else "--reject", "--note", note]
    code, tail, _ = _stream(cmd, _stage_env(), "promote")
    if code != 0:
        raise StageFailed("promote", f"exited with {USER_ERROR_EXIT}" in tail, tail)
    return publish("promote")


class SettingError(ValueError):
    """A Prefect setting the run reads (a variable, a block) that names nothing usable."""


def notifier(name: str | None) -> Any:
    """The Prefect notification block (e.g. "custom-webhook/nightly", "slack-webhook/ml-team")
    named by `name`, else by the Prefect variable NOTIFY_VARIABLE; None when neither names
    one. Loaded before any stage runs, so a wrong name fails the run at once."""
    from prefect.blocks.core import Block
    from prefect.variables import Variable

    name = name or Variable.get(NOTIFY_VARIABLE, default=None)
    if not name:
        return None
    try:
        return Block.load(name)
    except (ValueError, KeyError) as err:
        raise SettingError(f"notify_block {name!r}: no such Prefect block ({err}); `prefect block ls` lists "
                         "them, by TYPE-SLUG/NAME") from None


def notify(block: Any, verdict: str, text: str) -> None:
    """One short message through `block`: the verdict, what happened, the run's page. A
    message that cannot be sent is logged, and the run's own result stands."""
    if block is None:
        return
    from prefect.runtime import flow_run

    body = f"{verdict}: {text}" + (f"\n{flow_run.ui_url}" if flow_run.ui_url else "")
    try:
        block.notify(body=body, subject=f"finetune {flow_run.name}: {verdict}")
    except Exception as err:  # a webhook down must not turn a promotion into a failed run
        get_run_logger().warning("the %s message was not sent through %s: %s", verdict,
                                 type(block).__name__, err)


@flow(name="finetune", log_prints=True)
def finetune(overrides: ParamsOverride | None = None, force: bool = False, remote: bool = False,
             gpu_deployment: str | None = None,
             gpu_stages: tuple[str, ...] = DEFAULT_GPU_STAGES,
             sweep: dict[str, list[Any]] | None = None,
             approval_timeout_s: int = APPROVAL_TIMEOUT_S,
             notify_block: str | None = None) -> dict[str, Any]:
    """Run the fine-tuning pipeline of dvc.yaml.

    Args:
        overrides: values to change in params.yaml before running (validated like params.yaml;
            written to it, as `dvc exp run -S` does).
        force: rerun every stage even when DVC finds it up to date.
        remote: exchange artifacts through DVC's default remote: pull each stage's inputs
            before it runs, push its outputs (and run-cache entry) after.
        gpu_deployment: a deployment of the `finetune-stage` flow (e.g. "finetune-stage/gpu")
            that runs `gpu_stages` on its own work pool; needs `remote`.
        gpu_stages: the stages sent to `gpu_deployment`.
        sweep: instead of one run, a grid of params.yaml keys and values (e.g.
            {"train.learning_rate": [1e-4, 2e-4], "lora.r": [8, 16]}): every point runs as a
            DVC experiment up to evaluate, one after another, and the `sweep` table compares
            them.
        approval_timeout_s: with promote.approval: required, how long the run waits for a
            person to approve or reject the promotion; no answer rejects it.
        notify_block: a Prefect notification block ("TYPE-SLUG/NAME", e.g.
            "slack-webhook/ml-team") told of the promotion, refusal or failure; unset, the
            Prefect variable `finetune_notify_block` names it; neither: nothing is sent.
    """
    logger = get_run_logger()
    if gpu_deployment and not remote:
        raise ValueError("gpu_deployment needs remote: true (the stages' artifacts travel "
                         "between the two pools through the DVC remote)")
    if sweep and (remote or gpu_deployment):
        raise ValueError("sweep runs every point in this checkout: leave remote and gpu_deployment unset")
    if sweep:
        _apply(overrides)
        return run_sweep(sweep, force)
    block = notifier(notify_block)
    try:
        _apply(overrides)
        summary = _run_stages(force, remote, gpu_deployment, gpu_stages, overrides, approval_timeout_s)
    except BaseException as err:
        notify(block, "FAILED", err.summary() if isinstance(err, StageFailed) else f"{type(err).__name__}: {err}")
        raise
    if summary.get("promoted") is False:
        logger.warning("not promoted: %s", summary["promotion"])
    if summary["stages"].get("promote", {}).get("status") == "ran":  # a decision made by this run
        notify(block, "PROMOTED" if summary["promoted"] else "NOT PROMOTED", summary["promotion"])
    return summary


def _run_stages(force: bool, remote: bool, gpu_deployment: str | None, gpu_stages: tuple[str, ...],
                overrides: ParamsOverride | None, approval_timeout_s: int) -> dict[str, Any]:
    """Each stage as a task, in DVC's order, its UI artifacts published as it ends (and a
    promotion awaiting approval answered); the run's summary."""
    summary: dict[str, Any] = {"stages": {}}
    for stage in STAGES:
        elsewhere = bool(gpu_deployment) and stage in gpu_stages
        if elsewhere:
            where = _on_other_pool(gpu_deployment, stage, force, overrides)
        started = time.time()
        state = run_stage.with_options(**_stage_options(stage))(
            stage, force, remote, restore_only=elsewhere, return_state=True)
        refused = stage == "promote" and state.is_failed()
        if refused and _written_since(Workspace.from_env().metrics(stage), started):
            publish(stage)  # a refused serve check: the differing answers, for the UI
        result = state.result()  # raises the stage's error, failing the flow run
        summary["stages"][stage] = {k: result[k] for k in ("status", "version")}
        if elsewhere:
            summary["stages"][stage]["status"] = where
        summary.update(publish(stage))
        if summary.get("approval") == PENDING:
            summary.update(await_approval(approval_timeout_s))
    return summary


def _written_since(path: Path, since: float) -> bool:
    return path.is_file() and path.stat().st_mtime >= since


@flow(name="finetune-stage", log_prints=True)
def finetune_stage(stage: str, force: bool = False,
                   overrides: ParamsOverride | None = None,
                   meeting: NodeMeeting | None = None) -> dict[str, Any]:
    """Run one stage of dvc.yaml in this checkout, its inputs pulled from and its outputs
    pushed to DVC's default remote: what `finetune` sends to another work pool.

    Args:
        stage: the dvc.yaml stage to run (e.g. train).
        force: rerun it even when DVC finds it up to date.
        overrides: the parent run's params.yaml overrides, applied here too.
        meeting: set by the parent run when train runs on train.num_nodes nodes: where this
            node meets the others (one such run per node).
    """
    if stage not in STAGES:
        raise ValueError(f"no stage {stage!r} in dvc.yaml")
    _apply(overrides)
    options = _stage_options(stage)
    if meeting is not None:
        options["retries"] = 0  # a node alone cannot rejoin a meeting that is over: the parent fails
    with _environment(meeting.environment() if meeting else {}):
        result = run_stage.with_options(**options)(stage, force, remote=True, return_state=True).result()
    return {k: result[k] for k in ("stage", "status", "version")}


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` set, as it was after."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# What Prefect raises when the temporary API server it starts (no PREFECT_API_URL set) does not
# answer in time, as on a loaded machine or with a fresh PREFECT_HOME, whose database is set up
# first: a plain RuntimeError (prefect/server/api/server.py), known by its text only.
EPHEMERAL_TIMEOUT = "Timed out while attempting to connect to ephemeral Prefect API server"
EPHEMERAL_EXIT = re.compile(r"Ephemeral server process exited with code (-?\d+)")


def server_start_failure(err: BaseException) -> str | None:
    """The one line that says what to set when `err` is Prefect's temporary server failing
    to start; None for any other error."""
    if not isinstance(err, RuntimeError) or EPHEMERAL_TIMEOUT not in str(err):
        return None
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    exited = EPHEMERAL_EXIT.search(str(err))
    how = f"exited with code {exited.group(1)} before it answered" if exited else \
        f"did not answer within {PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()} s"
    return (f"Prefect's temporary API server {how} (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS): "
            "set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120 (a loaded machine, or a fresh "
            "PREFECT_HOME, takes longer), or start a server with `prefect server start` and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api")


def main() -> int:
    try:
        print(json.dumps(finetune(), indent=2))
    except StageFailed as err:
        print(f"python -m flows.finetune: error: {err.summary()}", file=sys.stderr)
        return USER_ERROR_EXIT if err.user_error else 1
    except SettingError as err:  # e.g. the variable finetune_notify_block names no block
        print(f"python -m flows.finetune: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if (message := server_start_failure(err)) is None:
            raise
        print(f"python -m flows.finetune: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
