"""Every model.task x every peft.method: train (2 steps), evaluate and export run on a tiny
model of the task (Llama, T5, BERT), and what export wrote loads back and answers: a
standalone model for the methods that merge, the adapter on its base for soft prompts. This
is the README's table of task types x methods, cell by cell."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tasks.config import PROMPT_LEARNING, TASKS, UNQUANTIZED_ONLY, parse_params
from tasks.errors import PipelineError
from tasks.modeling import AUTO_CLASSES

from .conftest import TASK_PARAMS, TINY_PARAMS, merge, shipped_params, stage, tokenized_dir

METHODS = ("lora", "dora", "adalora", "loha", "lokr", "ia3", *PROMPT_LEARNING)
STEPS = 2
# Tasks whose prefix_tuning cell train refuses under the locked versions (see
# tasks.adapters.takes_prefix_cache): none with transformers 5.23; every task with 5.24.
PREFIX_TUNING_REFUSED: set[str] = set()
TINY_MODEL_OF_TASK = {"causal_lm": "tiny_model", "seq2seq": "tiny_t5", "sequence_classification": "tiny_bert"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread while the cells run: the tiny models' matrices are too small to
    split, and on a busy 2-core host two threads spinning at each barrier made every cell
    several times slower (a seq2seq cell 35 s against 7 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=TASKS)
def task(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def prepared(task, request, tmp_path_factory):
    """The task's tiny model and sample data, prepared and tokenized once per task."""
    model = request.getfixturevalue(TINY_MODEL_OF_TASK[task])
    return tokenized_dir(tmp_path_factory.mktemp(f"methods-{task}"), model, task_params(task))


def task_params(task: str) -> dict:
    return merge(merge(shipped_params(), TINY_PARAMS), TASK_PARAMS[task])


def method_params(method: str, task: str = "causal_lm") -> dict:
    over: dict = {"peft": {"method": method}, "train": {"max_steps": STEPS, "save_steps": STEPS},
                  "evaluate": {"max_samples": 2, "max_new_tokens": 4}, "export": {"check_prompts": 1}}
    if method in UNQUANTIZED_ONLY:
        over.update(quant={"load_in_4bit": False}, export={"check_prompts": 1, "merge_into": "original"})
    if method in PROMPT_LEARNING:
        over["train"]["padding_free"] = False
    if method == "prefix_tuning":
        over["train"]["gradient_checkpointing"] = False
    if method == "adalora":
        over["lora"] = {"r": 4, "lora_alpha": 8}
        over["peft"]["adalora_target_r"] = 2
    return merge(task_params(task), over)


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_evaluates_exports_and_loads_back(task, method, prepared, tmp_path, monkeypatch):
    import peft
    import torch
    import transformers

    ws = tmp_path / "ws"
    shutil.copytree(prepared, ws)
    monkeypatch.chdir(ws)
    raw = method_params(method, task)
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    params = parse_params(raw, "params.yaml")

    if method == "prefix_tuning" and task in PREFIX_TUNING_REFUSED:
        with pytest.raises(PipelineError, match="peft.method: prefix_tuning needs a model whose forward takes past_key_values"):
            stage("train", params)
        assert not Path("artifacts/adapter/adapter_config.json").exists()
        return
    metrics = stage("train", params)
    assert metrics["steps"] == STEPS and metrics["trainable_params"] > 0
    config = json.loads(Path("artifacts/adapter/adapter_config.json").read_text())
    assert config["peft_type"].lower().replace("_", "") == {
        "dora": "lora", "p_tuning": "ptuning", "prompt_tuning": "prompttuning",
        "prefix_tuning": "prefixtuning"}.get(method, method).replace("_", "")
    assert config.get("use_dora", False) == (method == "dora")

    scores = stage("evaluate", params)
    assert set(scores) == {"base", "tuned", "delta"}
    headline = "accuracy" if task == "sequence_classification" else "rougeL"
    assert 0 <= scores["tuned"][headline]["mean"] <= 1

    exported = stage("export", params)
    merged = Path("artifacts/merged")
    manifest = json.loads((merged / "manifest.json").read_text())
    assert manifest["params"]["peft"]["method"] == method
    assert manifest["params"]["model"]["task"] == task
    assert exported["scores"]["metric"] == headline
    tok = transformers.AutoTokenizer.from_pretrained(merged)
    ids = tok("Summarize: it works well.", return_tensors="pt")
    if method in PROMPT_LEARNING:
        assert exported["merged"] is False and manifest["merged"] is False
        card = (merged / "README.md").read_text()
        auto = "AutoPeft" + AUTO_CLASSES[task].removeprefix("Auto")
        assert "Not a standalone model" in card and auto in card
        from tasks.modeling import task_kwargs

        model = getattr(peft, auto).from_pretrained(merged, **task_kwargs(params.model))
    else:
        assert exported["merged"] is True and exported["logits_max_abs_diff"] <= 1e-3
        assert not (merged / "adapter_config.json").exists()
        model = getattr(transformers, AUTO_CLASSES[task]).from_pretrained(merged)
    model.eval()
    with torch.inference_mode():
        if task == "sequence_classification":
            logits = model(**ids).logits
            assert logits.shape == (1, 2)
            assert model.config.id2label == {0: "negative", 1: "positive"}
        else:
            out = model.generate(**ids, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            prompt = 0 if task == "seq2seq" else ids["input_ids"].shape[1]
            assert out.shape[1] - prompt >= 3


def test_prefix_tuning_is_refused_for_a_forward_without_past_key_values():
    """What train says when transformers has renamed past_key_values (5.24: `cache`)."""
    import torch

    from tasks.adapters import check_supported

    params = parse_params(method_params("prefix_tuning"), "params.yaml")
    with pytest.raises(PipelineError, match=r"peft.method: prefix_tuning needs a model whose forward "
                                            r"takes past_key_values, and Linear \(model.task: causal_lm\)"):
        check_supported(params, torch.nn.Linear(2, 2))
    check_supported(parse_params(method_params("lora"), "params.yaml"), torch.nn.Linear(2, 2))


@pytest.mark.parametrize(("over", "needle"), [
    ({"peft": {"method": "loha"}}, "peft.method loha has no 4-bit"),
    ({"peft": {"method": "prefix_tuning"}, "train": {"padding_free": True}},
     "set train.padding_free: false"),
    # auto resolves to off for prefix_tuning (tests/test_memory.py); asking for it is refused
    ({"peft": {"method": "prefix_tuning"}, "train": {"gradient_checkpointing": True}},
     "train.gradient_checkpointing: false"),
    ({"peft": {"method": "adalora"}, "train": {"max_steps": -1}}, "positive train.max_steps"),
    ({"peft": {"method": "adalora", "adalora_target_r": 64}}, "must be below lora.r"),
])
def test_method_combinations_that_cannot_work_are_refused(over, needle):
    from tasks.errors import ConfigError

    with pytest.raises(ConfigError, match=needle):
        parse_params(merge(shipped_params(), over), "params.yaml")
