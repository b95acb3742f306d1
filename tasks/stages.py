"""The stage table: each dvc.yaml stage's name and its `run(params, ws)`, in dvc.yaml's order.

The CLI (`finetune <stage>`), the Prefect flow, `finetune check` and the tests read this
table; a stage's name is written here and in dvc.yaml, and a test keeps the two equal. Each
entry imports its module only when it runs, so listing the stages (`finetune --help`,
`finetune check`) loads no stage and no torch.

    from tasks.stages import run_stage
    run_stage("prepare", params, Workspace.from_env())
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tasks import use_cpu_math
from tasks.config import Params
from tasks.workspace import Workspace

Result = dict[str, Any]


def _prepare(params: Params, ws: Workspace) -> Result:
    from tasks import prepare

    return prepare.run(params, ws)


def _tokenize(params: Params, ws: Workspace) -> Result:
    from tasks import tokenize

    return tokenize.run(params, ws)


def _train(params: Params, ws: Workspace) -> Result:
    from tasks import train

    return train.run(params, ws)


def _align(params: Params, ws: Workspace) -> Result:
    from tasks import align

    return align.run(params, ws)


def _evaluate(params: Params, ws: Workspace) -> Result:
    from tasks import evaluate

    return evaluate.run(params, ws)


def _export(params: Params, ws: Workspace) -> Result:
    from tasks import export

    return export.run(params, ws)


def _promote(params: Params, ws: Workspace) -> Result:
    from tasks import promote

    return promote.run(params, ws)


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Params, Workspace], Result]
    # Whether its dvc.yaml inputs include data/raw/ or models/, whose links out of the
    # repository are refused (data.allow_external_links): DVC would not see them change.
    reads_local_inputs: bool


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("prepare", _prepare, reads_local_inputs=True),
    Stage("tokenize", _tokenize, reads_local_inputs=True),
    Stage("train", _train, reads_local_inputs=True),
    Stage("align", _align, reads_local_inputs=True),
    Stage("evaluate", _evaluate, reads_local_inputs=True),
    Stage("export", _export, reads_local_inputs=True),
    Stage("promote", _promote, reads_local_inputs=False),
)}


def check_local_inputs(params: Params, ws: Workspace) -> None:
    """Refuses links under data/ and models/ that point out of the repository (unless
    data.allow_external_links): DVC would not see what is behind them change. Each stage that
    reads those folders checks before it loads anything; `finetune check` checks once for all
    of them, so such a link fails before `dvc repro` starts."""
    from tasks.io import check_external_links

    check_external_links((ws.data_dir, ws.models_dir), params.data.allow_external_links)


def run_stage(name: str, params: Params, ws: Workspace) -> Result:
    """Runs one stage on `ws`, with the workspace root as the working directory (params'
    paths are relative to it)."""
    stage = STAGES[name]
    use_cpu_math(params.model.cpu_math)
    with ws.entered():
        if stage.reads_local_inputs:
            check_local_inputs(params, ws)
        return stage.run(params, ws)
