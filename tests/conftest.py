"""Shared fixtures: a tiny model built from a config and a throwaway git + DVC workspace.

Everything is real (DVC, PEFT, bitsandbytes, the Trainer); only the sizes are small.

Stages run in the test process (`stage`, `finetune`, and the session's `trained_workspace`,
built once and copied by `copy_workspace`): a fresh Python per stage pays 20-40 s of imports.
Real processes are started only where the process is the point (`run`): each runner end to
end, kill -9 and signals, another user's permissions.
"""

from __future__ import annotations

import contextlib
import io
import os

# One torch thread per test process (and the stage processes it starts, which inherit it):
# make test runs two workers on two cores, and two threads each stall one another (a tiny
# forward pass went from 38 ms to 285 ms at load 5). Set before anything imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks.config import deep_merge

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "raw" / "dialogues.jsonl"
REVIEWS = REPO / "data" / "raw" / "reviews.jsonl"  # the labelled set for sequence_classification
BIN = Path(sys.executable).parent
# Set for every stage the tests run, so they can check it is never written anywhere.
FAKE_HF_TOKEN = "hf_testTOKENthatMustNeverBeWritten"
CHAT_TOKENS_SEED = 0  # tiny_chat_model: the seed of its new tokens' embedding rows

# Small enough that every stage takes seconds on 2 CPU cores.
TINY_PARAMS: dict[str, dict[str, Any]] = {
    "data": {"max_rows": 120},
    "model": {"name_or_path": "models/tiny"},
    "lora": {"r": 4, "lora_alpha": 8},
    "tokenize": {"max_length": 160},
    "train": {"max_steps": 4, "per_device_train_batch_size": 4, "save_steps": 2},
    "evaluate": {"max_new_tokens": 8, "per_device_eval_batch_size": 8, "max_samples": 6,
                 "bootstrap_samples": 50},
    "export": {"check_prompts": 2},
}


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(PATH=f"{BIN}{os.pathsep}{e.get('PATH', '')}", HF_HUB_OFFLINE="1",
             DVC_NO_ANALYTICS="1", TOKENIZERS_PARALLELISM="false", HF_TOKEN=FAKE_HF_TOKEN,
             GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
             GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com")
    return e


def run(cmd: list[str], cwd: Path, check: bool = True,
        extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env={**env(), **(extra_env or {})}, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


merge = deep_merge

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_MISSING = "Chromium is not installed (make test installs Debian's chromium where apt-get can run as root)"
# Flags that keep headless Chromium off the (closed) network and usable as root.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-quic", "--window-size=1400,1000", "--virtual-time-budget=20000"]


def chromium(args: list[str], home: Path) -> str:
    """Headless Chromium with a fresh profile under `home`; returns its stdout (e.g. --dump-dom)."""
    profile = home / f"chromium-{time.monotonic_ns()}"
    proc = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)
    return proc.stdout


def shipped_params() -> dict[str, Any]:
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama (hidden 32) with a BPE tokenizer."""
    from tasks.smoke_model import build, texts_from_jsonl

    out = tmp_path_factory.mktemp("tiny") / "model"
    return build(texts_from_jsonl(SAMPLE), out, vocab_size=320, hidden_size=32,
                 num_attention_heads=2)


# ChatML as Qwen2's instruct models write it, with {% generation %} around each assistant
# message and its <|im_end|> (the tokenizer's EOS): what a multi-turn chat trains on.
CHATML_TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' }}"
    "{%- if m['role'] == 'assistant' %}{% generation %}{{- m['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- m['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="session")
def tiny_chat_model(tiny_model, tmp_path_factory) -> Path:
    """tiny_model with ChatML's special tokens, <|im_end|> as EOS and CHATML_TEMPLATE."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-chat") / "model"
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    # The new tokens' rows are drawn from torch's global generator: seeded, so the model (and
    # what a test of it sees) does not depend on which tests ran before in this process.
    torch.manual_seed(CHAT_TOKENS_SEED)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer T5 (d_model 32) for seq2seq, same tokenizer recipe."""
    from tasks.smoke_model import build, texts_from_jsonl

    return build(texts_from_jsonl(SAMPLE), tmp_path_factory.mktemp("tiny-t5") / "model", arch="t5",
                 vocab_size=320, hidden_size=32, num_attention_heads=2)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BERT encoder (hidden 32) for sequence_classification."""
    from tasks.smoke_model import build, texts_from_jsonl

    return build(texts_from_jsonl(REVIEWS), tmp_path_factory.mktemp("tiny-bert") / "model",
                 arch="bert", vocab_size=320, hidden_size=32, num_attention_heads=2)


# What params.yaml changes, on top of TINY_PARAMS, to train each model.task.
TASK_PARAMS: dict[str, dict[str, Any]] = {
    "causal_lm": {},
    "seq2seq": {"model": {"task": "seq2seq"}},
    "sequence_classification": {
        "model": {"task": "sequence_classification", "labels": ["negative", "positive"]},
        "data": {"path": "data/raw/reviews.jsonl"}, "prompt": {"template": "text_classification"}},
}


def make_workspace(dst: Path, tiny_model: Path, params: dict[str, Any] | None = None) -> Path:
    """A git + DVC repo holding this repository's tracked files, the tiny model and params."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file() and f != "dvc.lock":
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dst / f)
    shutil.copytree(tiny_model, dst / "models" / "tiny")
    (dst / "params.yaml").write_text(yaml.safe_dump(merge(shipped_params(), params or TINY_PARAMS),
                                                    sort_keys=False))
    run(["git", "init", "-q"], dst)
    run(["git", "add", "-A"], dst)
    run(["git", "commit", "-qm", "workspace"], dst)
    return dst


def stage(name: str, params: Any, root: Path | str = ".") -> dict[str, Any]:
    """Runs one stage in this process on the workspace at `root` (the stage table's way)."""
    from tasks.stages import run_stage
    from tasks.workspace import Workspace

    return run_stage(name, params, Workspace(Path(root).resolve()))


def tokenized_dir(root: Path, tiny_model: Path, raw: dict[str, Any]) -> Path:
    """`root` with the tiny model, the sample data and params.yaml (`raw`), prepared and
    tokenized in-process: for tests of train and later stages that need no git or DVC."""
    from tasks.config import parse_params

    shutil.copytree(tiny_model, root / "models/tiny")
    (root / "data/raw").mkdir(parents=True)
    for data in (SAMPLE, REVIEWS):
        shutil.copy(data, root / "data/raw" / data.name)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    params = parse_params(raw, "params.yaml")
    for name in ("prepare", "tokenize"):
        stage(name, params, root)
    return root


def finetune(ws: Path, *args: str,
             extra_env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess[str]:
    """`finetune ARGS` in `ws`, in this process: tasks.cli.main with the working directory,
    environment (`extra_env`'s None unsets a variable) and output streams a shell would give
    it; returns what a subprocess run would (exit code, stdout, stderr). An exception main()
    does not turn into a message propagates, as a traceback would end the process. Settings
    a library reads once at import (huggingface_hub's HF_HUB_OFFLINE, HF_HOME) keep their
    values: a test of those needs a process, or sets the library's constant itself."""
    from tasks.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd = dict(os.environ), Path.cwd()
    given = {k: v for k, v in env().items() if k != "PATH"} | (extra_env or {})
    os.environ.update({k: v for k, v in given.items() if v is not None})
    for name in (k for k, v in given.items() if v is None):
        os.environ.pop(name, None)
    os.chdir(ws)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exit_:  # argparse's usage errors
                code = exit_.code if isinstance(exit_.code, int) else 2
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(["finetune", *args], code, out.getvalue(), err.getvalue())


def mask_spans(tok, ids: list[int], mask: list[Any]) -> list[str]:
    """The decoded runs of tokens that `mask` trains (assistant turns, completions)."""
    spans, run = [], []
    for t, m in [*zip(ids, mask, strict=True), (None, 0)]:
        if m:
            run.append(t)
        elif run:
            spans.append(tok.decode(run))
            run = []
    return spans


def copy_workspace(src: Path, dst: Path) -> Path:
    """A copy of a built workspace (git and DVC state included) to change freely."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.fixture(scope="session")
def trained_workspace(tmp_path_factory, tiny_model) -> Path:
    """A git + DVC workspace with TINY_PARAMS after every stage of dvc.yaml, run in this
    process once per test session; tests that change it take a copy (copy_workspace)."""
    from tasks.config import load_params
    from tasks.stages import STAGES

    ws = make_workspace(tmp_path_factory.mktemp("trained"), tiny_model)
    params = load_params(ws / "params.yaml")
    for name in STAGES:
        stage(name, params, ws)
    return ws


SERVER_START_S = 180  # a server process on a loaded 2-core host: its imports, then its model


def wait_until_up(proc: subprocess.Popen, url: str) -> None:
    """Until the server process `proc` answers `url`/health; fails if it exits first."""
    import urllib.request

    deadline = time.monotonic() + SERVER_START_S
    while True:
        assert proc.poll() is None, f"the server at {url} exited with code {proc.returncode}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            assert time.monotonic() < deadline, f"the server did not answer {url}/health"
            time.sleep(0.5)
