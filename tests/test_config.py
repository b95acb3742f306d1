"""params.yaml validation: every problem reported at once, each naming its key path."""

import re
from collections.abc import Callable
from pathlib import Path
from types import FunctionType
from typing import Any

import pytest
import yaml

from tasks.cli import main
from tasks.config import RULES, Params, load_params, parse_params
from tasks.config import rules as cross
from tasks.errors import ConfigError

from .conftest import REPO, finetune, merge, shipped_params


def problems(over: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_params(merge(shipped_params(), over), "params.yaml")
    return info.value.problems


def test_shipped_params_validate():
    params = load_params(REPO / "params.yaml")
    assert params.model.name_or_path == "models/smoke-llama"
    assert params.quant.load_in_4bit and params.quant.bnb_4bit_quant_type == "nf4"


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_params_validate(path: Path):
    load_params(path)


def test_examples_exist():
    assert list((REPO / "examples").glob("*.yaml"))


def test_unknown_key_names_path_and_suggests():
    [problem] = problems({"train": {"learning_rte": 1e-4}})
    assert problem.startswith("train.learning_rte: unknown key (did you mean 'learning_rate'?)")


def test_all_problems_reported_together():
    found = problems({"lora": {"r": 0, "lora_dropout": 2}, "train": {"optimm": "x"},
                      "data": {"split": {"test_size": 0}}})
    keys = sorted(p.split(":")[0] for p in found)
    assert keys == ["data.split.test_size", "lora.lora_dropout", "lora.r", "train.optimm"]


def test_wrong_type_shows_value():
    [problem] = problems({"train": {"max_steps": "many"}})
    assert problem.startswith("train.max_steps:") and "'many'" in problem


def test_cross_field_rules():
    found = problems({"evaluate": {"max_new_tokens": 600}, "tokenize": {"max_length": 512},
                      "quant": {"load_in_4bit": False}})
    assert any("evaluate.max_new_tokens (600) must be below tokenize.max_length" in p for p in found)
    assert any("merge_into 'dequantized' needs quant.load_in_4bit" in p for p in found)


def test_cross_field_problems_follow_rules_order():
    found = problems({"quant": {"load_in_4bit": False}, "peft": {"method": "adalora", "adalora_target_r": 16},
                      "evaluate": {"max_new_tokens": 600}, "tokenize": {"max_length": 512}})
    assert [p.split(" ")[0] for p in found] == ["evaluate.max_new_tokens", "export.merge_into",
                                                "peft.adalora_target_r"]


def variant(**sections: dict[str, Any]) -> Params:
    """The shipped params with some keys of some sections changed, not validated: Params would
    refuse the rule's problem before a test could call the rule."""
    shipped = load_params(REPO / "params.yaml")
    return shipped.model_copy(update={name: getattr(shipped, name).model_copy(update=keys)
                                      for name, keys in sections.items()})


def test_shipped_params_pass_every_rule():
    shipped = load_params(REPO / "params.yaml")
    assert {rule.__name__: rule(shipped) for rule in RULES} == {rule.__name__: [] for rule in RULES}


def test_every_rule_is_run():
    defined = {f for f in vars(cross).values() if isinstance(f, FunctionType) and f.__module__ == cross.__name__}
    assert defined == set(RULES) and len(RULES) == len(set(RULES))


# One variant per rule, breaking that rule and no other.
BROKEN: dict[Callable[[Params], list[str]], tuple[dict[str, dict[str, Any]], str]] = {
    cross.max_new_tokens_fit: (
        {"evaluate": {"max_new_tokens": 256}, "tokenize": {"max_length": 256}},
        r"evaluate\.max_new_tokens \(256\) must be below tokenize\.max_length \(256\) to leave room"),
    cross.dequantized_merge_needs_4bit: (
        {"quant": {"load_in_4bit": False}},
        r"export\.merge_into 'dequantized' needs quant\.load_in_4bit: true"),
    cross.method_has_4bit: (
        {"peft": {"method": "loha"}},
        r"peft\.method loha has no 4-bit \(bitsandbytes\) implementation in PEFT"),
    cross.full_finetune_unquantized: (
        {"peft": {"method": "none"}},
        r"peft\.method none trains every weight, and 4-bit weights cannot be trained .* set "
        r"quant\.load_in_4bit: false"),
    cross.prompt_learning_unpacked: (
        {"peft": {"method": "prompt_tuning"}, "train": {"padding_free": True}},
        r"peft\.method prompt_tuning puts virtual tokens .* set train\.padding_free: false$"),
    cross.prefix_tuning_without_checkpointing: (
        {"peft": {"method": "prefix_tuning"}, "train": {"gradient_checkpointing": True}},
        r"peft\.method prefix_tuning feeds its prefixes as a KV cache"),
    cross.align_supported: (
        {"align": {"enabled": True}, "peft": {"method": "dora"}},
        r"align\.enabled needs prompt\.template other than chat and peft\.method lora"),
    cross.align_needs_adapter: (
        {"align": {"enabled": True}, "peft": {"method": "none"}, "quant": {"load_in_4bit": False},
         "export": {"merge_into": "original"}},
        r"align\.enabled goes on training train's adapter \(every align\.method\), and peft\.method none writes a whole "
        r"model instead: set align\.enabled: false$"),
    cross.padding_free_causal_lm_only: (
        {"model": {"task": "seq2seq"}, "train": {"padding_free": True}},
        r"train\.padding_free packs examples for causal LMs only \(model\.task is seq2seq\)"),
    cross.chat_template_causal_lm_only: (
        {"model": {"task": "seq2seq"}, "prompt": {"template": "chat"}},
        r"prompt\.template chat renders a causal LM's chat template; model\.task seq2seq needs a text"),
    cross.align_causal_lm_only: (
        {"model": {"task": "seq2seq"}, "align": {"enabled": True}},
        r"align\.enabled needs model\.task causal_lm \(align\.method scores completions of a causal "
        r"LM; task is seq2seq\)"),
    cross.kto_batch_of_two: (
        {"align": {"enabled": True, "method": "kto", "per_device_train_batch_size": 1}},
        r"align\.method kto estimates its KL term by pairing each prompt with another row's "
        r"completion in the same batch: set align\.per_device_train_batch_size to 2 or more \(it is 1\)$"),
    cross.grpo_whole_groups: (
        {"align": {"enabled": True, "method": "grpo", "num_generations": 4, "per_device_train_batch_size": 6}},
        r"align\.per_device_train_batch_size \(6\) counts GRPO's sampled answers and must hold whole "
        r"groups of align\.num_generations \(4\): e\.g\. 4$"),
    cross.grpo_completion_fits: (
        {"align": {"enabled": True, "method": "grpo", "max_completion_length": 256}},
        r"align\.max_completion_length \(256\) must be below tokenize\.max_length \(256\) to leave room "
        r"for the prompt$"),
    cross.kto_weights_for_kto: (
        {"align": {"method": "orpo", "undesirable_weight": 2.0}},
        r"align\.undesirable_weight weights KTO's loss and align\.method is orpo: set align\.method: "
        r"kto, or leave the weight at 1\.0$"),
    cross.references_fill_one_field: (
        {"data": {"references": ["summary"]}, "prompt": {"template": "{dialogue}", "completion": " {a} {b}"}},
        r"data\.references needs a generative model\.task and a text template"),
    cross.gguf_needs_merged_causal_lm: (
        {"export": {"gguf": "f16"}, "peft": {"method": "p_tuning"}},
        r"export\.gguf needs model\.task causal_lm and a peft\.method that merges"),
    cross.serve_check_needs_merged_causal_lm: (
        {"promote": {"serve_check_rows": 2}, "model": {"task": "seq2seq"}},
        r"promote\.serve_check_rows serves the candidate .* task is seq2seq"),
    cross.lm_eval_needs_causal_lm: (
        {"evaluate": {"lm_eval_tasks": ["hellaswag"]}, "model": {"task": "seq2seq"}},
        r"evaluate\.lm_eval_tasks scores a causal LM's log-likelihoods: .* \(not prompt_tuning, "
        r"prefix_tuning, p_tuning; task is seq2seq, method lora\)$"),
    cross.max_regression_needs_lm_eval: (
        {"promote": {"max_regression": 0.01}},
        r"promote\.max_regression checks the tasks of evaluate\.lm_eval_tasks, which is empty"),
    cross.adalora_needs_max_steps: (
        {"peft": {"method": "adalora"}, "train": {"max_steps": -1}},
        r"peft\.method adalora schedules its rank budget over train\.max_steps"),
    cross.adalora_target_below_r: (
        {"peft": {"method": "adalora", "adalora_target_r": 16}},
        r"peft\.adalora_target_r \(16\) must be below lora\.r \(16\), the rank AdaLoRA starts from"),
    cross.early_stopping_needs_eval_steps: (
        {"train": {"early_stopping_patience": 3}},
        r"train\.early_stopping_patience counts evaluations, and train\.eval_steps is null: set "
        r"eval_steps .*, or early_stopping_patience: null$"),
    cross.save_steps_on_eval_steps: (
        {"train": {"eval_steps": 30}},
        r"train\.save_steps \(50\) must be a multiple of train\.eval_steps \(30\), .*e\.g\. "
        r"save_steps: 60$"),
    cross.fsdp_across_processes: (
        {"train": {"fsdp": True}, "quant": {"load_in_4bit": False}, "export": {"merge_into": "original"}},
        r"train\.fsdp shards the model across training processes, and train\.num_processes \* "
        r"train\.num_nodes is 1: set num_processes \(or num_nodes\) to 2 or more, or fsdp: false$"),
    cross.fsdp_shards_what_trains: (
        {"train": {"fsdp": True, "num_processes": 2}},
        r"train\.fsdp does not shard bitsandbytes 4-bit weights: set quant\.load_in_4bit: false"),
}


def test_every_rule_has_a_broken_variant():
    assert list(BROKEN) == list(RULES)


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.__name__)
def test_rule_reports_its_problem(rule: Callable[[Params], list[str]]):
    sections, pattern = BROKEN[rule]
    params = variant(**sections)
    [problem] = rule(params)
    assert re.match(pattern, problem), problem
    assert [r.__name__ for r in RULES if r(params)] == [rule.__name__]


def test_fsdp_shards_lora_and_full_finetuning_only():
    params = variant(train={"fsdp": True, "num_processes": 2}, quant={"load_in_4bit": False},
                     export={"merge_into": "original"}, peft={"method": "ia3"})
    assert cross.fsdp_shards_what_trains(params) == [
        "train.fsdp shards peft.method lora or none (none: full fine-tuning), not ia3: set fsdp: "
        "false, or one of those methods"]


def test_split_sizes_leave_training_rows():
    [problem] = problems({"data": {"split": {"validation_size": 0.5, "test_size": 0.5}}})
    assert problem.startswith("data.split: validation_size + test_size must be below 1")


@pytest.mark.parametrize(("over", "needle"), [
    ({"model": {"name_or_path": "org/some-model"}}, "pin `revision`"),
    ({"data": {"path": "org/some-dataset"}}, "pin `revision`"),
    ({"data": {"path": "/tmp/x.jsonl"}}, "local data must be under data/raw/"),
    ({"model": {"name_or_path": "./elsewhere/model"}}, "a local model must be under models/"),
])
def test_inputs_must_be_tracked_or_pinned(over, needle):
    [problem] = problems(over)
    assert needle in problem


def test_custom_template_rules():
    assert "needs `completion` too" in problems({"prompt": {"template": "Q: {q}\nA:"}})[0]
    assert "bad placeholder '{q.x}'" in problems(
        {"prompt": {"template": "Q: {q.x}", "completion": "{a}"}})[0]
    assert "neither a built-in" in problems({"prompt": {"template": "dialog_summary"}})[0]


def test_cli_check_lists_every_problem(tmp_path, capsys):
    bad = merge(shipped_params(), {"lora": {"r": -1}, "train": {"lr": 1}})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert main(["check", "--params", str(path)]) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err and "lora.r" in err and "train.lr" in err
    assert "Traceback" not in err


def test_cli_check_reports_yaml_line(tmp_path, capsys):
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  path: [unclosed\n")
    assert main(["check", "--params", str(path)]) == 2
    assert "line 3" in capsys.readouterr().err


def test_stage_with_bad_params_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(merge(shipped_params(), {"train": {"seed": "x"}})))
    assert main(["prepare"]) == 2
    assert "train.seed" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / "params.yaml"]


def test_cli_check_refuses_a_key_given_twice(tmp_path, capsys):
    """PyYAML keeps the last of two keys; DVC refuses the file: so does check, naming both lines."""
    text = (REPO / "params.yaml").read_text().replace(
        "\ntrain:\n", "\ntrain:\n  learning_rate: 0.1\n", 1)
    path = tmp_path / "params.yaml"
    path.write_text(text)
    assert main(["check", "--params", str(path)]) == 2
    lines = text.splitlines()
    line = 1 + next(n for n in range(lines.index("train:") + 2, len(lines))
                    if lines[n].startswith("  learning_rate:"))
    err = capsys.readouterr().err
    assert f"line {line}, column 3: duplicate key 'learning_rate' (first at line " in err, err
    assert "DVC refuses a file with a key given twice" in err


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_nan_and_infinity_are_refused(value):
    assert problems({"promote": {"min_gain": float(value.replace(".", ""))}}) == [
        f"promote.min_gain: Input should be a finite number (got {float(value.replace('.', ''))!r})"]


def test_cli_check_refuses_params_dvc_yaml_lists_but_the_file_lacks(tmp_path, capsys):
    """The schema has defaults for model and quant, but dvc.yaml lists them: DVC would refuse
    to run the stages that read them."""
    raw = shipped_params()
    del raw["quant"], raw["model"]["revision"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["check", "--params", str(path)]) == 2
    err = capsys.readouterr().err
    assert ("  - model.revision: not set, and dvc.yaml's prepare, tokenize stage(s) read it (DVC will not run them "
            "without it): `finetune check --fill` writes it with its default (`finetune check --explain "
            "model.revision` says what it is)") in err, err
    assert "  - quant: not set, and dvc.yaml's train, align, evaluate, export, promote stage(s)" in err


def test_cli_check_fill_writes_what_dvc_yaml_reads_with_defaults_keeping_comments(tmp_path, capsys):
    """--fill adds exactly the keys dvc.yaml names that the file lacks, as the schema's
    defaults; the user's keys and comments stay; an invalid file gets nothing written."""
    from tasks.config import QuantConfig, missing_dvc_params

    path = tmp_path / "params.yaml"
    path.write_text("# my run\ntrain:\n  max_steps: 5  # short\nmodel:\n  name_or_path: models/smoke-llama\n"
                    "data:\n  path: data/raw/dialogues.jsonl\n")
    assert main(["check", "--fill", "--params", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: wrote ") and "model.revision" in out and "quant" in out
    text = path.read_text()
    assert text.startswith("# my run\ntrain:\n  max_steps: 5  # short\n")
    raw = yaml.safe_load(text)
    assert missing_dvc_params(raw) == {}
    assert raw["quant"] == QuantConfig().model_dump(mode="json") and raw["model"]["revision"] is None
    assert "learning_rate" not in raw["train"]  # not named by dvc.yaml: left to the default
    assert main(["check", "--fill", "--params", str(path)]) == 0
    assert "wrote" not in capsys.readouterr().out and path.read_text() == text

    bad = "data:\n  path: data/raw/dialogues.jsonl\ntrain:\n  max_steps: 0\n"
    path.write_text(bad)
    assert main(["check", "--fill", "--params", str(path)]) == 2
    assert path.read_text() == bad


@pytest.mark.parametrize("option, value, expected", [
    ("--bootstrap-samples", "-5", "--bootstrap-samples: Input should be greater than or equal to 10 "
                                  "(got -5; the rule of evaluate.bootstrap_samples)"),
    ("--confidence-level", "7", "--confidence-level: Input should be less than 1 "
                                "(got 7.0; the rule of evaluate.confidence_level)"),
])
def test_score_options_follow_the_params_rules(tmp_path, capsys, option, value, expected):
    (tmp_path / "p.txt").write_text("a cat\n")
    assert main(["score", "--predictions", str(tmp_path / "p.txt"), "--references", str(tmp_path / "p.txt"),
                 option, value]) == 2
    err = capsys.readouterr().err
    assert err == f"finetune score: error: command line: 1 problem(s):\n  - {expected}\n"


@pytest.mark.parametrize("data, expected", [
    ({"name": "default"}, "data: name: 'default' is a Hub dataset configuration, but path names local "
                          "files, which have none (nothing would read it): set name: null"),
    ({"revision": "main"}, "data: revision: 'main' is a Hub dataset tag or commit, but path names local "
                           "files, which have none (nothing would read it): set revision: null"),
    ({"path": None, "sources": [{"path": "data/raw/dialogues.jsonl", "name": "x"}]},
     "data: sources.0: name: 'x' is a Hub dataset configuration, but path names local files, which "
     "have none (nothing would read it): set name: null"),
    ({"path": None, "revision": "v1", "sources": [{"path": "org/dataset", "revision": "v2"}]},
     "data: revision: 'v1' is not read with data.sources, where each source has its own "
     "(sources.N.revision): move it there, and set revision: null here"),
])
def test_hub_only_keys_are_refused_where_nothing_reads_them(data, expected):
    """They were ignored without a word: prepare reads local files as they are, and a
    mixture's sources carry their own."""
    assert problems({"data": data}) == [expected]


def test_hub_only_keys_stay_for_hub_datasets():
    parse_params(merge(shipped_params(), {"data": {"path": "org/dataset", "name": "x", "revision": "v1"}}),
                 "params.yaml")


def test_cli_check_refuses_a_hub_only_key_with_local_data(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(merge(shipped_params(), {"data": {"revision": "main"}})))
    proc = finetune(REPO, "check", "--params", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[:2] == [
        f"finetune check: error: {path}: 1 problem(s):",
        "  - data: revision: 'main' is a Hub dataset tag or commit, but path names local files, which "
        "have none (nothing would read it): set revision: null"]


def test_cli_check_refuses_sizes_no_machine_holds(tmp_path):
    """The issue's trial: max_steps 1e12 with a batch of 1e9 passed check, and train ran,
    logging a 3.6M GiB estimate. From the local model's config.json (no torch), check refuses
    sizes whose activations and logits alone exceed 8 x 141 GiB and this host's memory."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(merge(shipped_params(), {
        "train": {"max_steps": 10**12, "per_device_train_batch_size": 10**9}})))
    proc = finetune(REPO, "check", "--params", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    first, problem = proc.stderr.splitlines()[:2]
    assert first == f"finetune check: error: {path}: 1 problem(s):"
    assert re.fullmatch(
        r"  - train\.per_device_train_batch_size \(1000000000\) with tokenize\.max_length \(256\): training "
        r"would need at least [\d,]+ GiB per process for activations and logits alone, more than any "
        r"machine holds \(1128 GiB: 8 x 141 GiB\) or this host \(\d+ GiB\): lower them \(raise "
        r"train\.gradient_accumulation_steps to keep the effective batch\)", problem), problem
    # A large batch a big machine could hold passes.
    path.write_text(yaml.safe_dump(merge(shipped_params(), {"train": {"per_device_train_batch_size": 4096}})))
    proc = finetune(REPO, "check", "--params", str(path))
    assert proc.returncode == 0, proc.stderr

