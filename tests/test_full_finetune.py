"""Full fine-tuning (`peft.method: none`): every weight of the tiny causal LM, T5 and BERT
classifier trains, train writes the whole model where the adapter goes, and evaluate,
export, promote and predict take it as the model it is; an interrupted run resumes to the
same weights; export.gguf converts the saved model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tasks import gguf
from tasks.config import parse_params
from tasks.errors import PipelineError

from .conftest import TASK_PARAMS, TINY_PARAMS, merge, shipped_params, stage, tokenized_dir

FULL = {"peft": {"method": "none"}, "quant": {"load_in_4bit": False},
        "export": {"merge_into": "original", "check_prompts": 2},
        "evaluate": {"max_samples": 4, "max_new_tokens": 4},
        # As a GPU run would have it (auto leaves it off for these tiny models).
        "train": {"gradient_checkpointing": True},
        # min_gain -1: promote whatever 4 steps give, so the registry holds the full fine-tune.
        "promote": {"min_gain": -1.0}}
TINY_OF_TASK = {"causal_lm": "tiny_model", "seq2seq": "tiny_t5", "sequence_classification": "tiny_bert"}


def full_params(task: str) -> dict:
    return merge(merge(merge(shipped_params(), TINY_PARAMS), TASK_PARAMS[task]), FULL)


@pytest.fixture(scope="module", params=sorted(TINY_OF_TASK))
def trained(request, tmp_path_factory):
    """(task, workspace, base model folder) with the task's tiny model fully fine-tuned."""
    task = request.param
    model = request.getfixturevalue(TINY_OF_TASK[task])
    root = tokenized_dir(tmp_path_factory.mktemp(f"full-{task}"), model, full_params(task))
    stage("train", parse_params(full_params(task), "params.yaml"), root)
    return task, root, model


@pytest.fixture
def ws(trained, tmp_path, monkeypatch):
    task, root, model = trained
    copy = shutil.copytree(root, tmp_path / "ws")
    monkeypatch.chdir(copy)
    return task, copy, parse_params(full_params(task), "params.yaml"), model


def test_every_weight_trains_and_the_whole_model_is_written(ws):
    task, root, params, base = ws
    metrics = json.loads((root / "metrics/train.json").read_text())
    assert metrics["trainable_params"] == metrics["total_params"] > 0
    folder = root / "artifacts/adapter"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert not (folder / "adapter_config.json").exists()
    before, after = load_file(base / "model.safetensors"), load_file(folder / "model.safetensors")
    # The tiny BERT is saved as a bare encoder: the classifier names its weights under "bert.".
    after = {k if k in before else k.partition(".")[2]: v for k, v in after.items()}
    assert before.keys() <= after.keys()
    # 4 AdamW steps move every tensor of the base (the classifier's new head is not in its file).
    assert [k for k in before if before[k].shape == after[k].shape and before[k].equal(after[k])] == []
    assert all(t.dtype.is_floating_point and t.element_size() == 4 for t in after.values())  # fp32 masters
    assert json.loads((folder / "config.json").read_text()).get("use_cache", True) is True
    assert not (root / "artifacts/checkpoints").exists()
    # The preflight counted 16 bytes per parameter (weights, gradients, AdamW's moments).
    assert metrics["estimated_peak_memory_gib"] * 2**30 > 16 * metrics["total_params"]


def test_evaluate_export_promote_and_predict_take_the_whole_model(ws):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    from tasks import predict
    from tasks.workspace import Workspace

    task, root, params, _ = ws
    scores = stage("evaluate", params)
    headline = "accuracy" if task == "sequence_classification" else "rougeL"
    assert 0 <= scores["tuned"][headline]["mean"] <= 1

    exported = stage("export", params)
    assert exported["merged"] is False and exported["full_finetune"] is True
    assert exported["logits_max_abs_diff"] == 0.0  # saved and read back in float32: exactly itself
    assert exported["scores"]["merged"] == exported["scores"]["adapter"]
    merged = root / "artifacts/merged"
    assert not (merged / "adapter_config.json").exists()
    card = (merged / "README.md").read_text()
    assert "full fine-tuning, no adapter" in card and "tags: [fine-tuned, full-fine-tuning]" in card
    manifest = json.loads((merged / "manifest.json").read_text())
    assert manifest["merged"] is False and manifest["params"]["peft"]["method"] == "none"
    # The export is train's model itself: the same weights, as a plain transformers model.
    cls = {"causal_lm": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM,
           "sequence_classification": AutoModelForSequenceClassification}[task]
    trained_weights = load_file(root / "artifacts/adapter/model.safetensors")
    exported_weights = load_file(merged / "model.safetensors")
    assert all(torch.equal(trained_weights[k], exported_weights[k]) for k in trained_weights)
    cls.from_pretrained(merged)

    decision = stage("promote", params)
    assert decision["promoted"] is True
    latest = json.loads((root / "registry/latest.json").read_text())
    assert (Path(latest["path"]) / "model.safetensors").is_file()

    source = root / "data/raw" / ("reviews.jsonl" if task == "sequence_classification" else "dialogues.jsonl")
    (root / "data/raw/new.jsonl").write_text("".join(source.read_text().splitlines(keepends=True)[:5]))
    answers = {}
    for model in ("artifacts/adapter", "registry/latest"):
        out = root / f"out/{model.replace('/', '_')}.jsonl"
        result = predict.run(params, Workspace(root), root / "data/raw/new.jsonl", model, out)
        assert result["rows"] > 0
        answers[model] = out.read_text()
    assert answers["artifacts/adapter"] == answers["registry/latest"]


def test_an_adapter_where_a_whole_model_is_expected_is_one_message(ws):
    task, root, params, _ = ws
    folder = root / "artifacts/adapter"
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(PipelineError, match=r"artifacts/adapter holds a PEFT adapter, but peft.method is "
                                            r"none .*: rerun `dvc repro train`$"):
        stage("evaluate", params)


def test_an_interrupted_full_fine_tune_resumes_to_the_same_weights(ws, monkeypatch):
    from transformers import Trainer

    task, root, params, _ = ws
    if task != "causal_lm":
        pytest.skip("the Trainer resumes both tasks alike; one is enough")
    uninterrupted = (root / "artifacts/adapter/model.safetensors").read_bytes()
    shutil.rmtree(root / "artifacts/adapter")
    save = Trainer._save_checkpoint

    def killed_after_first_checkpoint(self, *args, **kwargs):
        save(self, *args, **kwargs)
        raise KeyboardInterrupt  # stands for a kill: the checkpoint is on disk, nothing after it

    monkeypatch.setattr(Trainer, "_save_checkpoint", killed_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        stage("train", params)
    assert [p.name for p in (root / "artifacts/checkpoints").glob("checkpoint-*")] == ["checkpoint-2"]
    assert (root / "artifacts/checkpoints/checkpoint-2/optimizer.pt").is_file()  # every weight's moments
    monkeypatch.setattr(Trainer, "_save_checkpoint", save)
    metrics = stage("train", params)
    assert metrics["steps"] == params.train.max_steps
    assert (root / "artifacts/adapter/model.safetensors").read_bytes() == uninterrupted


@pytest.mark.skipif(not (gguf.CONVERTER_DIR / gguf.CONVERTER).is_file(),
                    reason="llama.cpp's converter is not unpacked (make test runs `make gguf-converter`)")
def test_export_gguf_converts_the_fine_tuned_model(ws):
    task, root, params, _ = ws
    if task != "causal_lm":
        pytest.skip("GGUF holds decoder models (export.gguf is refused for classifiers)")
    raw = merge(full_params(task), {"export": {"gguf": "f16"}})
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    params = parse_params(raw, "params.yaml")
    exported = stage("export", params)
    assert exported["gguf"]["file"] == "model-f16.gguf"
    assert (root / "artifacts/merged/model-f16.gguf").stat().st_size == exported["gguf"]["bytes"] > 0
    assert abs(exported["scores"]["gguf"] - exported["scores"]["merged"]) <= params.export.metric_atol
