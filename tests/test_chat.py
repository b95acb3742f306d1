"""Multi-turn chat (prompt.template: chat): prepare -> tokenize -> train on conversations
whose every assistant turn is trained, and the refusal when the chat template cannot mark them."""

from __future__ import annotations

import json
import math
import shutil
import urllib.request
from pathlib import Path

import pytest
import yaml

from tasks.cli import main
from tasks.config import parse_params
from tasks.encoding import IGNORE_INDEX
from tasks.modeling import load_tokenizer

from .conftest import TINY_PARAMS, merge, shipped_params, stage

CHAT_PARAMS = merge(merge(shipped_params(), TINY_PARAMS), {
    "data": {"path": "data/raw/chats.jsonl"}, "prompt": {"template": "chat"},
    "train": {"max_steps": 2, "per_device_train_batch_size": 4, "save_steps": 2}})


def conversations(n: int = 40) -> list[dict]:
    """Chats of one to three exchanges, with a system message on every other one."""
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": "Answer briefly."}] if i % 2 else []
        for turn in range(1 + i % 3):
            messages += [{"role": "user", "content": f"Question {i}.{turn}?"},
                         {"role": "assistant", "content": f"Answer {i}.{turn}."}]
        out.append({"id": f"chat{i}", "messages": messages})
    return out


def workspace(root: Path, model: Path, chat_template: str | None = None) -> list[dict]:
    """A checkout with `model` and chats; `chat_template`: a template text given as
    model.chat_template."""
    shutil.copytree(model, root / "models/tiny")
    (root / "data/raw").mkdir(parents=True)
    chats = conversations()
    (root / "data/raw/chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    params = CHAT_PARAMS
    if chat_template is not None:
        (root / "models/plain.jinja").write_text(chat_template)
        params = merge(CHAT_PARAMS, {"model": {"chat_template": "models/plain.jinja"}})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return chats


def test_every_assistant_turn_is_trained_end_to_end(tmp_path, monkeypatch, tiny_chat_model):
    import datasets

    monkeypatch.chdir(tmp_path)
    chats = {c["id"]: c["messages"] for c in workspace(tmp_path, tiny_chat_model)}
    params = parse_params(CHAT_PARAMS, "params.yaml")
    stage("prepare", params)
    stats = stage("tokenize", params)
    assert stats["train"]["rows_without_eos_label"] == 0

    saved = datasets.load_from_disk("data/tokenized")["train"]
    tok = load_tokenizer(params.model, "data/tokenized/tokenizer")
    for row in saved:
        answers = [m["content"] for m in chats[row["id"]] if m["role"] == "assistant"]
        trained = [t for t, label in zip(row["input_ids"], row["labels"], strict=True)
                   if label != IGNORE_INDEX]
        assert tok.decode(trained) == "".join(a + "<|im_end|>" for a in answers)
    # The preview: each assistant turn inside [[ ]], the rest outside.
    preview = Path("reports/label_preview.txt").read_text().split("\n\n", 1)[1].split("\n\n-----\n\n")
    assert len(preview) == params.tokenize.preview_rows == 3
    for shown, row in zip(preview, saved, strict=False):
        assert shown.rstrip("\n") == "".join(
            f"<|im_start|>{m['role']}\n" + (f"[[{m['content']}<|im_end|>]]" if m["role"] == "assistant"
                                            else f"{m['content']}<|im_end|>") + "\n"
            for m in chats[row["id"]]).rstrip("\n")
    assert max(sum(m["role"] == "assistant" for m in chats[row["id"]]) for row in saved.select(range(3))) > 1

    metrics = stage("train", params)
    assert metrics["steps"] == 2 and math.isfinite(metrics["train_loss"])
    assert (Path("artifacts/adapter") / "chat_template.jinja").is_file()


def test_multi_turn_chat_on_a_template_without_markers_exits_2_with_one_message(
        tmp_path, monkeypatch, capsys, tiny_model):
    monkeypatch.chdir(tmp_path)
    # A template without {% generation %} blocks that is not ChatML (the smoke model's has them).
    workspace(tmp_path, tiny_model, "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                                    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    assert main(["prepare"]) == 0
    capsys.readouterr()
    assert main(["tokenize"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the log lines and progress bar
    assert err.startswith("finetune tokenize: error: prepared row ")
    assert "prompt.template: chat" in err and "{% generation %}" in err
    assert "model.chat_template (models/plain.jinja)" in err and "assistant turns" in err
    assert not Path("data/tokenized").exists() and not Path("reports/label_preview.txt").exists()


@pytest.mark.slow
def test_the_served_chat_model_answers_chat_completions_as_evaluate_did(tmp_path, monkeypatch, tiny_chat_model):
    """`finetune serve` on a chat model's export: /v1/chat/completions, given a test
    conversation up to its last user turn, answers (greedy) what evaluate predicted for it,
    since both render the conversation with the same chat template."""
    import signal
    import subprocess

    from tasks.io import read_jsonl
    from tasks.serve import free_port

    from .conftest import env, wait_until_up

    monkeypatch.chdir(tmp_path)
    chats = {c["id"]: c["messages"] for c in workspace(tmp_path, tiny_chat_model)}
    params = parse_params(merge(CHAT_PARAMS, {"evaluate": {"max_samples": 4}}), "params.yaml")
    for name in ("prepare", "tokenize", "train", "evaluate", "export"):
        stage(name, params)
    port = free_port("127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(["finetune", "serve", "--model", "artifacts/merged", "--port", str(port)],
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_up(proc, url)
        rows = read_jsonl(Path("reports/predictions.jsonl"))
        assert any(row["tuned"] for row in rows)  # not only empty answers (the tiny model may stop at once)
        for row in rows:
            body = json.dumps({"model": str(tmp_path / "artifacts/merged"), "messages": chats[row["id"]][:-1],
                               "max_tokens": params.evaluate.max_new_tokens, "temperature": 0}).encode()
            request = urllib.request.Request(f"{url}/v1/chat/completions", body, {"content-type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                served = json.loads(response.read())["choices"][0]["message"]["content"]
            assert served.strip() == row["tuned"], row["id"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
