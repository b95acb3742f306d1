"""promote.registry: mlflow: the local registry mirrored into MLflow's Model Registry.

Every promote run registers its candidate (artifacts/merged, the model the serve check and
`finetune serve` serve) as a version of the registered model `promote.mlflow_model`, and moves
the alias `challenger` to it; `champion` moves only when the promotion is applied (at once, or
on approval). MLflow replaced model stages with aliases: a serving system or another team reads
`models:/NAME@champion`. A version is a run in the experiment MLFLOW_EXPERIMENT_NAME (default
`finetune-promote`) holding the model folder as its `model` artifact, the params, the scores
and these tags: the git commit, the sha256 of the model folder, the test rows' and params'
sha256, and dvc.lock's md5 of every output the model came from (`dvc.<path>`). A candidate
already registered (the same sha256) is not uploaded again: its version gets the alias.

Why the merged model rather than the adapter and a reference to the base: what MLflow holds
is then what was scored and served, loadable with no base at hand and no merge step; the cost
is storage (a 7B model in bfloat16 is 14 GB a version), which an artifact store on S3 or GCS
takes, and unchanged candidates are not uploaded twice.

The tracking URI comes from MLFLOW_TRACKING_URI, as for every MLflow client. Any MLflow error
(unreachable, refused, a bad name) ends promote with one PipelineError, before the local
registry changes. MLflow's client retries a dead server for minutes by default:
MLFLOW_HTTP_REQUEST_MAX_RETRIES and MLFLOW_HTTP_REQUEST_TIMEOUT shorten that.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from tasks.config import Params, _flatten
from tasks.errors import PipelineError
from tasks.workspace import Workspace

CHAMPION, CHALLENGER = "champion", "challenger"  # the aliases
DEFAULT_EXPERIMENT = "finetune-promote"
ARTIFACT = "model"  # the model folder's path inside the version's run
SHA256_TAG = "sha256"


def _uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise PipelineError("promote.registry is mlflow, but MLFLOW_TRACKING_URI is not set: set it to the "
                            "tracking server (e.g. http://mlflow.internal:5000), or set promote.registry "
                            "to local")
    return uri


@contextmanager
def _talking(uri: str, doing: str) -> Iterator[None]:
    """Any MLflow failure as one line naming the server and the step."""
    try:
        yield
    except PipelineError:
        raise
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:400]
        raise PipelineError(f"MLflow at {uri} failed while {doing} ({type(err).__name__}: {first}); "
                            "neither registry was changed: check that the server runs and "
                            "MLFLOW_TRACKING_URI names it, or set promote.registry to local") from None


def _lineage(ws: Workspace) -> dict[str, str]:
    """Where the candidate came from: the git commit and dvc.lock's output hashes (the stages
    before promote, which DVC has locked by the time promote runs)."""
    tags = {}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws.root, capture_output=True, text=True)
    tags["git_commit"] = commit.stdout.strip() if commit.returncode == 0 else "unknown (not a git checkout)"
    lock = ws.root / "dvc.lock"
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) if lock.is_file() else {}
    for name, stage in stages.items():
        if name != "promote":
            tags |= {f"dvc.{out['path']}": out.get("md5", "") for out in stage.get("outs", [])}
    return tags


def register(folder: Path, sha256: str, decision: dict[str, Any], params: Params,
             ws: Workspace) -> dict[str, Any]:
    """The candidate's version (new, or the one already holding this sha256), with the
    `challenger` alias on it: {uri, model, version, run_id}."""
    uri = _uri()
    name = params.promote.mlflow_model
    with _talking(uri, f"registering the candidate as a version of {name!r}"):
        import mlflow
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        client = MlflowClient(tracking_uri=uri)
        try:
            client.get_registered_model(name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            client.create_registered_model(name, description="Fine-tuned models registered by the "
                                                             "finetune pipeline's promote stage")
        found = client.search_model_versions(f"name='{name}' and tag.{SHA256_TAG}='{sha256}'")
        if found:
            version = max(found, key=lambda v: int(v.version))
        else:
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT)
            tags = {SHA256_TAG: sha256, "test_sha256": decision["test_sha256"],
                    "params_sha256": params.digest(), "metric": decision["metric"]} | _lineage(ws)
            difference = decision["difference"]
            with mlflow.start_run(run_name=f"candidate-{sha256[:16]}", tags=tags) as run:
                mlflow.log_params({k: str(v) for k, v in _flatten(params.model_dump(mode="json")).items()})
                mlflow.log_metrics({"challenger_score": decision["challenger"]["score"],
                                    "champion_score": decision["champion"]["score"],
                                    "difference": difference["mean"], "difference_ci_low": difference["ci_low"],
                                    "difference_ci_high": difference["ci_high"]})
                mlflow.log_artifacts(str(folder), ARTIFACT)
            scores = {"challenger_score": str(decision["challenger"]["score"]),
                      "difference": f"{difference['mean']} (CI {difference['ci_low']}, {difference['ci_high']})"}
            version = client.create_model_version(name, source=f"runs:/{run.info.run_id}/{ARTIFACT}",
                                                  run_id=run.info.run_id, tags=tags | scores)
        client.set_registered_model_alias(name, CHALLENGER, version.version)
    return {"uri": uri, "model": name, "version": int(version.version), "run_id": version.run_id}


def crown(entry: dict[str, Any]) -> None:
    """Moves the `champion` alias to the version `register` returned."""
    with _talking(entry["uri"], f"moving {entry['model']!r}@{CHAMPION} to version {entry['version']}"):
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=entry["uri"]).set_registered_model_alias(entry["model"], CHAMPION,
                                                                          str(entry["version"]))
