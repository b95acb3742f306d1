"""The general-capability check (evaluate.lm_eval_tasks, promote.max_regression) with the real
lm-evaluation-harness, offline, on the repository's own multiple-choice task
(data/lm_eval/smoke_mc.yaml), and a planted case of catastrophic forgetting.

The tiny random model knows nothing, so the test first gives it something to forget: a few
dozen full-weight steps on the task's questions with their right answers make it the base
that "knew" the task. The pipeline then fine-tunes LoRA (prepare, tokenize, train) on the same
questions with wrong answers, evaluate runs the harness on base and tuned, and promote must
refuse the release although the challenger clears min_gain (set to -1 here, since the tiny
models' ROUGE cannot order them).

The tests in this module share one workspace and run in order."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.config import parse_params
from tasks.errors import ConfigError, PipelineError

from .conftest import REPO, TINY_PARAMS, merge, shipped_params, stage

TASK = "data/lm_eval/smoke_mc.yaml"
NAME = "finetune_smoke_mc"  # the YAML's `task`
ITEMS = REPO / "data/lm_eval/smoke_mc.jsonl"
MAX_REGRESSION = 0.1
TEACH_STEPS = 60  # full-weight steps that make the tiny model answer the task right (0.96 by hand)
TEACH_LR = 3e-2
COPIES = 3  # training rows per question, each with another wrong answer

FORGET = {
    "data": {"path": "data/raw/contradict.jsonl", "max_rows": None},
    "prompt": {"template": "Question: {question}\nAnswer:", "completion": " {answer}"},
    "quant": {"load_in_4bit": False},  # the taught weights as they are, not rounded to 4 bits
    "export": {"merge_into": "original"},
    "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
    "tokenize": {"max_length": 48},
    "train": {"max_steps": 20, "learning_rate": 2e-2, "per_device_train_batch_size": 8,
              "warmup_steps": 0, "gradient_checkpointing": False, "save_steps": 1000},
    "evaluate": {"max_new_tokens": 4, "max_samples": 4, "bootstrap_samples": 50,
                 "lm_eval_tasks": [TASK]},
    "promote": {"min_gain": -1.0, "max_regression": MAX_REGRESSION},
}


def raw(**over) -> dict:
    return merge(merge(shipped_params(), TINY_PARAMS), merge(FORGET, over))


def items() -> list[dict]:
    return [json.loads(line) for line in ITEMS.read_text().splitlines()]


def teach(model_dir: Path, out: Path) -> Path:
    """`model_dir`'s model trained (all weights) on the task's questions and right answers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    texts = [f"Question: {r['question']}\nAnswer: {r['choices'][r['answer']]}{tokenizer.eos_token}"
             for r in items()]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=TEACH_LR)
    model.train()
    for _ in range(TEACH_STEPS):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for the module: the tiny model's matrices are too small to split,
    and on a busy 2-core host two threads spinning at each barrier made the run 2x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("lm-eval")
    teach(tiny_model, root / "models/tiny")
    shutil.copytree(REPO / "data/lm_eval", root / "data/lm_eval")
    (root / "data/raw").mkdir(parents=True)
    # The planted forgetting: the same questions, each answered wrong COPIES times.
    rows = [{"id": f"{r['id']}-{k}", "question": r["question"],
             "answer": r["choices"][(r["answer"] + 1 + k) % len(r["choices"])]}
            for r in items() for k in range(COPIES)]
    (root / "data/raw/contradict.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cwd = os.getcwd()
    os.chdir(root)
    yield root
    os.chdir(cwd)


@pytest.fixture(scope="module")
def forgot(ws):
    """One run, prepare to promote, in this process: (evaluate's lm_eval metrics, decision)."""
    params = parse_params(raw(), "params.yaml")
    for name in ("prepare", "tokenize", "train", "evaluate", "export"):
        stage(name, params)
    return json.loads(Path("metrics/lm_eval.json").read_text()), stage("promote", params)


def test_the_harness_scores_base_and_tuned_side_by_side(forgot):
    capability, _ = forgot
    assert capability["enabled"] is True and capability["tasks"] == [TASK]
    assert capability["limit"] is None and capability["num_fewshot"] is None
    assert set(capability["scores"]) == {NAME}
    row = capability["scores"][NAME]
    assert {k: row[k] for k in ("spec", "task", "metric", "higher_is_better", "num_examples")} == {
        "spec": TASK, "task": NAME, "metric": "acc,none", "higher_is_better": True,
        "num_examples": len(items())}
    # The taught base answers (nearly) every question; the fine-tune trained it away.
    assert row["base"] >= 0.9
    assert row["tuned"] < row["base"] - MAX_REGRESSION
    assert row["delta"] == pytest.approx(row["tuned"] - row["base"], abs=1e-6)
    assert row["drop"] == pytest.approx(-row["delta"], abs=1e-6)
    assert row["base_stderr"] >= 0 and row["tuned_stderr"] > 0


def test_the_tuned_score_is_what_the_harness_gets_loading_base_and_adapter_itself(forgot):
    """evaluate hands the harness its loaded models; the harness's own loader
    (`pretrained=` the base, `peft=` the adapter) gives the same score."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    capability, _ = forgot
    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": "models/tiny", "peft": "artifacts/adapter",
                                "tokenizer": "artifacts/adapter", "device": "cpu"},
        tasks=[TASK], task_manager=TaskManager(include_defaults=False), bootstrap_iters=0,
        log_samples=False)
    assert out["results"][NAME]["acc,none"] == pytest.approx(capability["scores"][NAME]["tuned"], abs=1e-6)


def test_a_planted_forgetting_case_trips_max_regression(forgot):
    capability, decision = forgot
    row = capability["scores"][NAME]
    assert decision["difference"]["mean"] >= decision["min_gain"]  # the test-set gate alone would pass
    assert decision["promoted"] is False
    assert decision["lm_eval"] == {
        "max_regression": MAX_REGRESSION, "regressed": [NAME],
        "tasks": {NAME: {"metric": "acc,none", "base": row["base"], "tuned": row["tuned"], "drop": row["drop"]}}}
    assert (f"general capability lost: {NAME} acc,none dropped {row['drop']:.4f} (base {row['base']:.4f} "
            f"-> tuned {row['tuned']:.4f}) > max_regression {MAX_REGRESSION}: not promoted") in decision["reason"]
    assert json.loads(Path("metrics/promote.json").read_text()) == decision
    assert not Path("registry/latest.json").exists()


def test_a_drop_within_max_regression_is_promoted_and_recorded(forgot):
    capability, _ = forgot
    decision = stage("promote", parse_params(raw(promote={"max_regression": 1.0}), "params.yaml"))
    assert decision["promoted"] is True and decision["lm_eval"]["regressed"] == []
    assert "no task of evaluate.lm_eval_tasks dropped by more than max_regression 1.0: promoted" in decision["reason"]
    latest = json.loads(Path("registry/latest.json").read_text())
    assert latest["lm_eval"] == decision["lm_eval"]
    entry = json.loads((Path(latest["path"]) / "promotion.json").read_text())
    assert entry["lm_eval"]["tasks"][NAME]["drop"] == capability["scores"][NAME]["drop"]


def test_promote_refuses_lm_eval_metrics_made_with_other_settings(forgot):
    with pytest.raises(PipelineError, match=r"metrics/lm_eval.json was not made with the current "
                                            r"evaluate.lm_eval_tasks.*run `finetune evaluate`"):
        stage("promote", parse_params(raw(evaluate={"lm_eval_limit": 5}), "params.yaml"))


def test_off_by_default_records_it_and_never_imports_the_harness(tmp_path, monkeypatch):
    from tasks import harness
    from tasks.workspace import Workspace

    monkeypatch.chdir(tmp_path)
    params = parse_params(shipped_params(), "params.yaml")
    assert params.evaluate.lm_eval_tasks == [] and params.promote.max_regression is None
    Path("metrics").mkdir()
    assert harness.write(params, Workspace(tmp_path), None, None) == {"enabled": False, "tasks": [], "limit": None,
                                                 "num_fewshot": None, "scores": {}}
    code = ("import sys, tasks.evaluate, tasks.promote, tasks.cli; "
            "sys.exit('lm_eval' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


@pytest.mark.parametrize(("over", "needle"), [
    ({"promote": {"max_regression": 0.02}},
     "promote.max_regression checks the tasks of evaluate.lm_eval_tasks, which is empty"),
    ({"evaluate": {"lm_eval_tasks": ["tasks/mine.yaml"]}},
     r"evaluate.lm_eval_tasks: 'tasks/mine.yaml': a task YAML must be under data/lm_eval/"),
    ({"evaluate": {"lm_eval_tasks": ["arc_easy", "arc_easy"]}}, "a task is listed twice"),
    ({"evaluate": {"lm_eval_tasks": [TASK]}, "peft": {"method": "prompt_tuning"}},
     "evaluate.lm_eval_tasks scores a causal LM's log-likelihoods"),
    ({"evaluate": {"lm_eval_tasks": [TASK]}, "model": {"task": "sequence_classification",
                                                       "labels": ["negative", "positive"]}},
     "needs model.task causal_lm"),
    ({"evaluate": {"lm_eval_tasks": [TASK]}, "model": {"task": "seq2seq"}}, "needs model.task causal_lm"),
    ({"promote": {"max_regression": -0.1}, "evaluate": {"lm_eval_tasks": [TASK]}},
     "promote.max_regression: Input should be greater than or equal to 0"),
    ({"evaluate": {"lm_eval_limit": 0}}, "evaluate.lm_eval_limit"),
])
def test_settings_that_cannot_work_are_refused_naming_the_key(over, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_params(merge(shipped_params(), over), "params.yaml")


def test_a_missing_task_yaml_names_the_key():
    from tasks import harness

    with pytest.raises(PipelineError, match=r"evaluate.lm_eval_tasks: 'data/lm_eval/missing.yaml': no such file"):
        harness._task_names(["data/lm_eval/missing.yaml"])
