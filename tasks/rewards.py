"""GRPO's rewards (align.rewards): the built-ins and a user's own function, each turned into a
TRL reward function `f(prompts, completions, references, **kwargs) -> list[float]` named after
the reward, so TRL logs it as rewards/NAME/mean.

A user function is loaded from a .py file inside the repository, named by its dotted module
path; a file that resolves outside the repository (a symlink), under models/ or under data/
(downloads and pipeline outputs, not code) is refused: it would run code DVC does not track as
the project's.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.config import DATA_DIR, MODELS_DIR, Params, RewardConfig
from tasks.errors import ConfigError, PipelineError

RewardFunc = Callable[..., list[float]]
# Folders a reward function may not be loaded from: model files and data, not code.
NOT_CODE = (MODELS_DIR, DATA_DIR.parent)


def _normal(text: str) -> str:
    return " ".join(text.split()).lower()


def exact_match(completions: list[str], references: list[list[str]]) -> list[float]:
    return [float(any(_normal(c) == _normal(r) for r in refs)) for c, refs in zip(completions, references, strict=True)]


def length(completions: list[str], target: int) -> list[float]:
    """1 at `target` words, falling linearly to 0 at none or twice as many."""
    return [max(0.0, 1 - abs(len(c.split()) - target) / target) for c in completions]


def regex(completions: list[str], pattern: str) -> list[float]:
    compiled = re.compile(pattern)
    return [float(compiled.search(c) is not None) for c in completions]


def rouge(completions: list[str], references: list[list[str]], use_stemmer: bool) -> list[float]:
    from tasks.scoring import per_example

    return per_example([c.strip() for c in completions], references, use_stemmer)["rougeL"]


def _user_function(spec: str, key: str, root: Path) -> RewardFunc:
    module, _, name = spec.partition(":")
    path = root / Path(*module.split(".")).with_suffix(".py")
    real, top = path.resolve(), root.resolve()
    if not real.is_relative_to(top) or any(real.is_relative_to(top / d) for d in NOT_CODE):
        raise _refused(key, f"{spec} must be a .py file inside the repository, outside "
                       f"{', '.join(f'{d}/' for d in NOT_CODE)} ({path} resolves to {real})")
    if not real.is_file():
        raise _refused(key, f"{spec} names {path.relative_to(root)}, which does not exist")
    loader = importlib.util.spec_from_file_location(f"align_reward_{module}", real)
    assert loader is not None and loader.loader is not None
    code = importlib.util.module_from_spec(loader)
    try:
        loader.loader.exec_module(code)
    except Exception as err:  # the user's module: any failure is theirs to see in one line
        raise _refused(key, f"importing {path.relative_to(root)} failed: {type(err).__name__}: {err}") from None
    function = getattr(code, name, None)
    if not callable(function):
        raise _refused(key, f"{path.relative_to(root)} has no function {name!r}")
    return function


def _refused(key: str, problem: str) -> ConfigError:
    return ConfigError("params.yaml", [f"{key}.function: {problem}"])


def _scorer(reward: RewardConfig, key: str, params: Params, root: Path) -> Callable[[list[str], list[list[str]], list[str]], list[float]]:
    """(completions, references, prompts) -> one float per completion."""
    if reward.name == "function":
        assert reward.function is not None
        user = _user_function(reward.function, key, root)

        def function(completions: list[str], references: list[list[str]], prompts: list[str]) -> list[float]:
            scores = user(completions=completions, references=references, prompts=prompts)
            if len(scores) != len(completions):
                raise PipelineError(f"{key}.function: {reward.function} returned {len(scores)} rewards for "
                                  f"{len(completions)} answers (one float each)")
            return [float(s) for s in scores]

        return function
    if reward.name == "rouge":
        return lambda c, refs, _: rouge(c, refs, params.evaluate.use_stemmer)
    if reward.name == "exact_match":
        return lambda c, refs, _: exact_match(c, refs)
    if reward.name == "regex":
        assert reward.pattern is not None
        return lambda c, _, __: regex(c, reward.pattern)
    assert reward.target is not None
    return lambda c, _, __: length(c, reward.target)


def reward_functions(params: Params, root: Path) -> list[RewardFunc]:
    """align.rewards as TRL reward functions, in order (GRPOConfig.reward_weights follows it)."""
    out = []
    for i, reward in enumerate(params.align.rewards):
        score = _scorer(reward, f"align.rewards[{i}]", params, root)

        def trl_reward(prompts: list[str], completions: list[str], references: list[list[str]],
                       score=score, **_: Any) -> list[float]:
            return score(completions, references, prompts)

        # TRL logs each reward as rewards/<__name__>/mean; a name used twice gets its index.
        names = [r.name for r in params.align.rewards]
        trl_reward.__name__ = reward.name if names.count(reward.name) == 1 else f"{reward.name}_{i}"
        out.append(trl_reward)
    return out
