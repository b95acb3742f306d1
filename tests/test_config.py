"""params.yaml validation: every problem reported at once, each naming its key path."""

from pathlib import Path

import pytest
import yaml

from tasks.cli import main
from tasks.config import load_params, parse_params
from tasks.errors import ConfigError

from .conftest import REPO, merge, shipped_params


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
