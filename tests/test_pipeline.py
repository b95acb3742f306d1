"""End to end: the real `dvc repro` over all five stages in a throwaway git + DVC repo with a
tiny model, then the reproducibility rules: a no-op rerun, exactly the downstream stages
rerunning after each kind of change, and byte-identical forced training.

The tests in this module run in order on one workspace.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tasks.stages import STAGES as stage_table

from .conftest import FAKE_HF_TOKEN, make_workspace, run

# A runner end to end: skipped by `make test-fast`.
pytestmark = pytest.mark.e2e

STAGES = list(stage_table)  # dvc.yaml order; tests/test_structure.py keeps the two equal


def ran(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def repro(ws: Path, *args: str) -> list[str]:
    return ran(run(["dvc", "repro", *args], ws).stdout)


def lock_md5(ws: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == path)


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def set_param(ws: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params[section][key] = value
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


LOGS: list[str] = []


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model) -> Path:
    ws = make_workspace(tmp_path_factory.mktemp("pipeline"), tiny_model)
    proc = run(["dvc", "repro"], ws)
    LOGS.append(proc.stdout + proc.stderr)
    assert ran(proc.stdout) == STAGES
    return ws


def test_hub_token_is_never_written(ws):
    assert LOGS and FAKE_HF_TOKEN not in LOGS[0]
    for path in ws.rglob("*"):
        if path.is_file() and not {".git", "tests"} & set(path.relative_to(ws).parts):
            assert FAKE_HF_TOKEN.encode() not in path.read_bytes(), path


def test_each_stage_writes_exactly_its_outputs(ws):
    assert files(ws / "data/prepared") == {"train.jsonl", "validation.jsonl", "test.jsonl"}
    assert files(ws / "data/tokenized") == {
        "dataset_dict.json", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
        "tokenizer/chat_template.jinja",
        *(f"{s}/{f}" for s in ("train", "validation")
          for f in ("data-00000-of-00001.arrow", "dataset_info.json", "state.json"))}
    assert files(ws / "artifacts/adapter") == {
        "adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json",
        "tokenizer_config.json", "chat_template.jinja"}
    assert files(ws / "artifacts/merged") == {
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json", "chat_template.jinja", "README.md", "manifest.json"}
    assert files(ws / "metrics") == {"prepare.json", "tokenize.json", "train.json", "train_log.tsv",
                                     "eval_log.tsv", "align.json", "eval.json", "lm_eval.json", "export.json", "promote.json",
                                     ".gitignore"}
    assert files(ws / "artifacts/aligned") == {"README.md"}  # align.enabled is false by default
    # progress.json: train's live status for the Prefect flow (git-ignored, not a DVC output).
    assert files(ws / "reports") == {"predictions.jsonl", "eval_preview.md", "label_preview.txt",
                                     "progress.json", ".gitignore"}
    assert not (ws / "artifacts/checkpoints").exists()


def test_metrics_contents(ws):
    evaluation = json.loads((ws / "metrics/eval.json").read_text())
    assert set(evaluation) == {"base", "tuned", "delta"}
    for model in ("base", "tuned"):
        assert set(evaluation[model]) == {"num_examples", "rouge1", "rouge2", "rougeL", "rougeLsum"}
        assert evaluation[model]["num_examples"] == 6
        for t in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
            s = evaluation[model][t]
            assert set(s) == {"mean", "ci_low", "ci_high"} and s["ci_low"] <= s["mean"] <= s["ci_high"]
    assert set(evaluation["delta"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    predictions = [json.loads(x) for x in (ws / "reports/predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 6 and set(predictions[0]) == {"id", "prompt", "reference", "base", "tuned",
                                                             "base_score", "tuned_score"}
    train = json.loads((ws / "metrics/train.json").read_text())
    assert train["steps"] == 4 and train["tokens_seen"] > 0
    assert (ws / "metrics/train_log.tsv").read_text().splitlines()[0] == "step\tloss\tlearning_rate\ttokens_seen\teval_loss"
    export = json.loads((ws / "metrics/export.json").read_text())
    assert export["merged"] is True and export["logits_max_abs_diff"] <= 1e-3
    manifest = json.loads((ws / "artifacts/merged/manifest.json").read_text())
    # By content only: a git commit in this DVC output would change its hash every commit.
    assert set(manifest) == {"params_sha256", "params", "inputs", "libraries", "merged"}
    assert manifest["inputs"]["base_model"]["sha256"]
    assert "ROUGE-L" in (ws / "artifacts/merged/README.md").read_text()
    shown = run(["dvc", "metrics", "show", "--json"], ws).stdout
    assert "tuned" in shown and "rougeL" in shown
    plots = run(["dvc", "plots", "show", "--json"], ws).stdout
    assert "train_log.tsv::loss" in plots and "eval_log.tsv::eval_loss" in plots  # one plot, both curves


def test_merged_model_loads_standalone(ws):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(ws / "artifacts/merged")
    tok = AutoTokenizer.from_pretrained(ws / "artifacts/merged")
    assert tok.pad_token_id != tok.eos_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert not hasattr(model.config, "quantization_config")


def test_second_repro_is_a_noop(ws):
    out = run(["dvc", "repro"], ws).stdout
    assert ran(out) == [] and "Data and pipelines are up to date" in out


def test_promotion_gate_result(ws):
    decision = json.loads((ws / "metrics/promote.json").read_text())
    assert decision["metric"] == "rougeL" and decision["champion"]["model"] == "base"
    evaluation = json.loads((ws / "metrics/eval.json").read_text())
    assert decision["challenger"]["score"] == evaluation["tuned"]["rougeL"]["mean"]
    assert decision["promoted"] == (decision["difference"]["mean"] >= decision["min_gain"])
    assert (ws / "registry/latest.json").is_file() == decision["promoted"]


def flagged(ws: Path) -> set[str]:
    """The stages `dvc status` finds out of date: those whose own inputs changed (the stages
    downstream of them follow once they rerun, as test_training_param_reruns_train_and_after
    shows for real)."""
    return set(json.loads(run(["dvc", "status", "--json"], ws).stdout))


@pytest.mark.parametrize(("section", "key", "value", "stages"), [
    ("evaluate", "preview_rows", 2, {"evaluate"}),
    # promote's paired bootstrap reads evaluate's bootstrap settings.
    ("evaluate", "bootstrap_samples", 60, {"evaluate", "promote"}),
    ("export", "check_prompts", 3, {"export"}),
    ("promote", "min_gain", 0.5, {"promote"}),
])
def test_a_param_flags_exactly_the_stages_that_read_it(ws, section, key, value, stages):
    before = (ws / "params.yaml").read_text()
    set_param(ws, section, key, value)
    try:
        assert flagged(ws) == stages
    finally:
        (ws / "params.yaml").write_text(before)
    assert flagged(ws) == set()


def test_training_param_reruns_train_and_after(ws):
    set_param(ws, "lora", "lora_dropout", 0.1)
    assert repro(ws) == ["train", "align", "evaluate", "export", "promote"]


@pytest.mark.parametrize(("change", "stage"), [
    ("prompt", "prepare"), ("data", "prepare"), ("model", "prepare"), ("tokenize", "tokenize"),
    ("code", "train"),
])
def test_each_input_is_a_dependency(ws, change, stage):
    """`dvc status` flags the first stage reading each input (running them all is slow;
    that downstream stages follow is shown above)."""
    edits = {
        "prompt": ("params.yaml", lambda t: t.replace("template: dialogue_summary",
                                                     "template: 'Summarize: {dialogue}'")
                   .replace("completion: null", "completion: ' {summary}'")),
        "data": ("data/raw/dialogues.jsonl", lambda t: t.replace("Anna", "Annie", 1)),
        "model": ("models/tiny/config.json", lambda t: t.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05')),
        "tokenize": ("params.yaml", lambda t: t.replace("preview_rows: 3", "preview_rows: 2")),
        "code": ("tasks/train.py", lambda t: t + "\n# touched\n"),
    }
    path, edit = edits[change]
    before = (ws / path).read_text()
    after = edit(before)
    assert after != before
    (ws / path).write_text(after)
    try:
        status = json.loads(run(["dvc", "status", "--json"], ws).stdout)
        assert min(status, key=STAGES.index) == stage
        if change == "model":
            # Every stage, promote too: it re-scores a champion exported as an adapter on the base.
            assert set(status) == set(STAGES)
    finally:
        (ws / path).write_text(before)
    assert json.loads(run(["dvc", "status", "--json"], ws).stdout) == {}


def test_dvc_experiment_with_a_param_override(ws):
    run(["git", "add", "-A"], ws)
    run(["git", "commit", "-qm", "after reruns"], ws)
    # A key only promote reads: the experiment reruns that (torch-free) stage alone.
    out = run(["dvc", "exp", "run", "-S", "promote.min_gain=0.25"], ws).stdout
    assert ran(out) == ["promote"]
    shown = json.dumps(json.loads(run(["dvc", "exp", "show", "--json"], ws).stdout))
    assert "min_gain" in shown and "0.25" in shown


def test_forced_training_is_byte_identical(ws):
    first = lock_md5(ws, "train", "artifacts/adapter")
    assert repro(ws, "--force", "--single-item", "train") == ["train"]
    assert lock_md5(ws, "train", "artifacts/adapter") == first
