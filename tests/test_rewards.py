"""GRPO's rewards (tasks/rewards.py): the built-ins score as documented, and a user's reward
function loads only from a .py file inside the repository, outside models/ and data/."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.config import parse_params
from tasks.errors import ConfigError
from tasks.rewards import reward_functions

from .conftest import merge, shipped_params

ANSWERS = ["Maya and Nina  will play chess.", "maya and nina will play chess.", "They argue."]
REFERENCES = [["Maya and Nina will play chess."]] * 3


def scores(rewards: list[dict], root: Path = Path(".")) -> dict[str, list[float]]:
    params = parse_params(merge(shipped_params(), {"align": {"method": "grpo", "rewards": rewards}}), "params.yaml")
    return {f.__name__: f(prompts=["p"] * 3, completions=ANSWERS, references=REFERENCES, id=["a", "b", "c"])
            for f in reward_functions(params, root)}


def test_built_in_rewards():
    got = scores([{"name": "exact_match"}, {"name": "regex", "pattern": r"^They\b"},
                  {"name": "length", "target": 3}, {"name": "rouge"}])
    assert got["exact_match"] == [1.0, 1.0, 0.0]  # whitespace and case aside
    assert got["regex"] == [0.0, 0.0, 1.0]
    assert got["length"] == [0.0, 0.0, pytest.approx(2 / 3)]  # 6 words: twice the target
    assert got["rouge"][:2] == [1.0, 1.0] and got["rouge"][2] < 0.5


def test_a_reward_named_twice_is_logged_by_its_index():
    assert list(scores([{"name": "exact_match"}, {"name": "exact_match", "weight": 0.5}])) == [
        "exact_match_0", "exact_match_1"]


def test_a_user_function_from_the_repository(tmp_path):
    (tmp_path / "rewards").mkdir()
    (tmp_path / "rewards/mine.py").write_text(
        "def brevity(completions, references, prompts):\n"
        "    return [1.0 / len(c.split()) for c in completions]\n")
    got = scores([{"name": "function", "function": "rewards.mine:brevity"}], tmp_path)
    assert got == {"function": [1 / 6, 1 / 6, 1 / 2]}


@pytest.mark.parametrize(("where", "message"), [
    ("models/evil.py", r"must be a \.py file inside the repository, outside models/, data/"),
    ("data/raw/evil.py", r"must be a \.py file inside the repository, outside models/, data/"),
    ("link.py", r"must be a \.py file inside the repository, outside models/, data/ \(.*resolves to"),
    (None, r"names elsewhere\.py, which does not exist"),
])
def test_a_user_function_outside_the_code_is_refused(tmp_path, where, message):
    outside = tmp_path / "outside.py"
    outside.write_text("def f(completions, references, prompts):\n    return [0.0] * len(completions)\n")
    root = tmp_path / "repo"
    root.mkdir()
    if where == "link.py":
        (root / where).symlink_to(outside)
    elif where is not None:
        (root / where).parent.mkdir(parents=True)
        (root / where).write_text(outside.read_text())
    module = where.removesuffix(".py").replace("/", ".") if where else "elsewhere"
    with pytest.raises(ConfigError, match=r"align\.rewards\[0\]\.function: \S+:f " + message):
        scores([{"name": "function", "function": f"{module}:f"}], root)


def test_a_user_module_without_the_function_is_refused(tmp_path):
    (tmp_path / "mine.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match=r"align\.rewards\[0\]\.function: mine\.py has no function 'f'"):
        scores([{"name": "function", "function": "mine:f"}], tmp_path)


@pytest.mark.parametrize(("reward", "message"), [
    ({"name": "regex"}, r"pattern is for name: regex only, and needed there \(this reward is regex\)"),
    ({"name": "rouge", "target": 5}, r"target is for name: length only, and needed there \(this reward is rouge\)"),
    ({"name": "regex", "pattern": "(unclosed"}, r"pattern '\(unclosed' is not a regular expression"),
    ({"name": "function", "function": "../evil.py:f"}, r"function '\.\./evil\.py:f' must read module:function"),
])
def test_a_reward_missing_or_misusing_its_field_is_refused(reward, message):
    with pytest.raises(ConfigError, match=r"align\.rewards\.0.*" + message):
        parse_params(merge(shipped_params(), {"align": {"rewards": [reward]}}), "params.yaml")
