"""push: upload the exported model (artifacts/merged, or a promoted one under registry/) to
the Hugging Face Hub, model card and manifest included.

Not a DVC stage: publishing is a decision, not a step a rerun should repeat. The token comes
from the environment (HF_TOKEN) only, never from params or arguments. With HF_HUB_OFFLINE set
(as `make run` sets it) nothing is uploaded and the command says so.

    HF_TOKEN=... HF_HUB_OFFLINE=0 finetune push --repo-id my-org/my-model [--private]
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from tasks.errors import PipelineError
from tasks.io import TOKEN_VARIABLES, read_json_state, redact

log = logging.getLogger("finetune.push")

REQUIRED_FILES = ("README.md", "manifest.json")  # what export writes: card and lineage


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _git_commit(root: Path) -> str:
    """The commit pushed from (named in the Hub commit message; the exported folder records
    none, or its DVC hash would change with every commit)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(repo_id: str, folder: Path, private: bool = False) -> dict[str, Any]:
    missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
    if not folder.is_dir() or missing:
        raise PipelineError(f"{folder}: not an exported model (missing {', '.join(missing) or 'folder'}); "
                            "run the export stage first (dvc repro export)")
    manifest = read_json_state(folder / "manifest.json", required={"params_sha256": str}, recover=(
        "rerun `dvc repro export`, or restore the folder from a backup"))
    if _offline():
        log.warning("HF_HUB_OFFLINE is set: not pushing %s to %s (set HF_HUB_OFFLINE=0 to push)",
                    folder, repo_id)
        return {"pushed": False, "reason": "offline"}
    token = next((os.environ[v] for v in TOKEN_VARIABLES if os.environ.get(v)), None)
    if token is None:
        raise PipelineError("pushing needs a Hugging Face token with write access in the "
                            "environment: set HF_TOKEN")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    commit = _git_commit(Path.cwd())
    message = f"finetune-pipeline: params {manifest['params_sha256'][:12]}, git {commit[:12]}"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message)
    except Exception as err:  # network, auth and naming errors all end the same way for the user
        raise PipelineError(f"push to {repo_id} failed: {redact(str(err))}") from None
    log.info("pushed %s to %s: %s", folder, repo_id, commit.commit_url)
    return {"pushed": True, "repo_id": repo_id, "commit_url": commit.commit_url}
