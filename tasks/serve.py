"""`finetune serve`: a saved model behind an OpenAI-compatible HTTP API, by `transformers
serve` (FastAPI and uvicorn): POST /v1/completions and /v1/chat/completions, GET /health and
/v1/models. Not a DVC stage: it runs until stopped (SIGTERM or Ctrl-C ends it cleanly).

The model is the champion (registry/latest.json's entry: promote's copy of the merged model)
unless --model names another folder export wrote (artifacts/merged); tasks.registry.servable
picks it. Served greedily (temperature 0), it answers the test prompts as evaluate's tuned
predictions do (tests/test_predict.py). On a GPU host with vLLM, `vllm serve <folder>` serves
the same folder.

`answers` runs the same server for the length of one call: promote's serve check
(promote.serve_check_rows) sends it test prompts before a promotion is applied.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.errors import PipelineError
from tasks.io import console_script


def command(folder: Path, host: str, port: int) -> list[str]:
    found = console_script("transformers")
    if found is None:
        raise PipelineError("the `transformers` command is not installed here (make setup installs it)")
    return [found, "serve", "--host", host, "--port", str(port), str(folder)]


def serve(folder: Path, host: str, port: int) -> None:
    """Replaces this process with the server, so a signal sent to it reaches uvicorn."""
    cmd = command(folder, host, port)
    print(f"serving {folder} at http://{host}:{port}/v1 (OpenAI-compatible; model name: {folder})",
          file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)


START_TIMEOUT_S = 300  # a cold start imports torch and transformers and loads the model
REQUEST_TIMEOUT_S = 300  # one greedy completion, on a CPU
STOP_TIMEOUT_S = 60  # SIGTERM to exit; then SIGKILL
POLL_S = 0.5
LOG_TAIL_CHARS = 2000  # of the server's output, quoted when it fails


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def running(folder: Path, host: str = "127.0.0.1") -> Iterator[str]:
    """`transformers serve` on `folder` at a free port, answering /health, for the block;
    yields its base URL. The server is stopped (SIGTERM, then SIGKILL) however the block ends."""
    port = free_port(host)
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command(folder, host, port), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

        def failed(why: str) -> PipelineError:
            log.seek(0)
            return PipelineError(f"transformers serve on {folder} {why}; its output ends:\n"
                                 f"{log.read()[-LOG_TAIL_CHARS:]}")
        try:
            url = f"http://{host}:{port}"
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    raise failed(f"exited with code {proc.returncode} before it answered")
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=POLL_S * 4):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise failed(f"did not answer {url}/health within {START_TIMEOUT_S} s") from None
                    time.sleep(POLL_S)
            yield url
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def complete(url: str, folder: Path, prompt: str, max_tokens: int) -> str:
    """The server's greedy (temperature 0) completion of `prompt` (POST /v1/completions)."""
    body = json.dumps({"model": str(folder), "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", body, {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return json.loads(response.read())["choices"][0]["text"]
    except (OSError, ValueError, KeyError, IndexError) as err:
        raise PipelineError(f"transformers serve on {folder} gave no completion at {url}/v1/completions: "
                            f"{err}") from None


def answers(folder: Path, prompts: list[str], max_tokens: int) -> list[str]:
    """The served model's greedy answers to `prompts`, from a server started for this call."""
    with running(folder) as url:
        return [complete(url, folder, prompt, max_tokens) for prompt in prompts]
