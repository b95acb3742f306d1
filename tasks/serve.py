"""`finetune serve`: a saved model behind an OpenAI-compatible HTTP API, by `transformers
serve` (FastAPI and uvicorn): POST /v1/completions and /v1/chat/completions, GET /health and
/v1/models. Not a DVC stage: it runs until stopped (SIGTERM or Ctrl-C ends it cleanly).

The model is the champion (registry/latest.json's entry: promote's copy of the merged model)
unless --model names another folder export wrote (artifacts/merged). Served greedily
(temperature 0), it answers the test prompts as evaluate's tuned predictions do
(tests/test_predict.py). On a GPU host with vLLM, `vllm serve <folder>` serves the same folder.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from tasks.errors import PipelineError
from tasks.registry import latest
from tasks.workspace import Workspace


def model_folder(model: str | None, ws: Workspace) -> Path:
    """The folder to serve: `model`, or the champion's."""
    if model is None:
        entry = latest(ws)
        if entry is None:
            raise PipelineError(f"nothing to serve: {ws.latest} names no champion yet (run promote), "
                                "or give --model a model folder, e.g. artifacts/merged")
        folder = Path(entry["path"])
    else:
        folder = Path(model)
    if not (folder / "config.json").is_file():
        raise PipelineError(f"{folder} is not a saved model (no config.json): give --model a folder "
                            "export wrote (artifacts/merged) or a registry entry; an adapter folder "
                            "needs `finetune export` first")
    return folder.resolve()


def command(folder: Path, host: str, port: int) -> list[str]:
    beside = Path(sys.executable).parent / "transformers"
    found = str(beside) if beside.exists() else shutil.which("transformers")
    if found is None:
        raise PipelineError("the `transformers` command is not installed here (make setup installs it)")
    return [found, "serve", "--host", host, "--port", str(port), str(folder)]


def serve(model: str | None, host: str, port: int, ws: Workspace) -> None:
    """Replaces this process with the server, so a signal sent to it reaches uvicorn."""
    folder = model_folder(model, ws)
    cmd = command(folder, host, port)
    print(f"serving {folder} at http://{host}:{port}/v1 (OpenAI-compatible; model name: {folder})",
          file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)
