"""Reading params.yaml into `Params`, reporting problems by key path, and writing overrides."""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from tasks.config.base import TAG
from tasks.config.params import Params
from tasks.errors import ConfigError


# Shows a wrong value without its whole content: a YAML alias bomb expands to billions of items.
SHORT = reprlib.Repr()
SHORT.maxlevel, SHORT.maxlist, SHORT.maxdict, SHORT.maxstring = 2, 4, 4, 80


def _key_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _allowed(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names allowed at `loc`'s parent, for suggesting a fix to an unknown key."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def describe(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith(("function-", TAG))))
        key = _key_path(loc)
        if e["type"] == "extra_forbidden" and "token" in str(loc[-1]).lower():
            problems.append(f"{key}: tokens never go in params (they would land in dvc.lock, git "
                            "and the model's manifest); set HF_TOKEN in the environment instead")
        elif e["type"] == "extra_forbidden":
            allowed = _allowed(Params, loc)
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{key}: unknown key{hint}; allowed here: {', '.join(allowed)}")
        elif e["type"] == "value_error":
            for line in str(e["ctx"]["error"]).splitlines():
                problems.append(f"{key}: {line}" if loc else line)
        else:
            got = "" if e["type"] == "missing" else f" (got {SHORT.repr(e['input'])})"
            problems.append(f"{key}: {e['msg']}{got}")
    return problems


def parse_params(raw: Any, source: str) -> Params:
    if not isinstance(raw, dict):
        raise ConfigError(source, ["the file must be a mapping of sections (data, prompt, model, ...)"])
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(source, describe(err)) from None


DUPLICATE = "duplicate key"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last, DVC
    refuses the file, so `check` would pass what `dvc repro` rejects."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # SafeLoader's own message names it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{DUPLICATE} {key!r} (first at line {seen[key]}): keep one; DVC "
                    "refuses a file with a key given twice", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(str(path), ["file not found"])
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (safe)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = str(getattr(err, "problem", err))
        what = problem if problem.startswith(DUPLICATE) else f"not valid YAML ({problem})"
        raise ConfigError(str(path), [f"{where}{what}"]) from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), ["not UTF-8 text"]) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    return parse_params(read_yaml(path), str(path))


def _partial(model: type[BaseModel]) -> type[BaseModel]:
    """The same model with every field optional: the shape of an override."""
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            ann = _partial(ann)
        fields[name] = (ann | None, Field(None, description=info.description))
    return create_model(f"{model.__name__}Override", __config__=ConfigDict(extra="forbid"), **fields)


# Overrides of params.yaml values (the Prefect flow's parameter form): any subset of the keys,
# checked by the full Params model once merged into params.yaml.
ParamsOverride = _partial(Params)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with `over` merged in, section by section."""
    out = dict(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def apply_overrides(path: Path, overrides: BaseModel | dict[str, Any]) -> dict[str, Any]:
    """Validate `overrides` merged into the params file and write them into it, keeping its
    comments (as `dvc exp run -S` does). Returns the changed keys; writes nothing if invalid."""
    from ruamel.yaml import YAML

    over = overrides.model_dump(exclude_unset=True) if isinstance(overrides, BaseModel) else overrides
    parse_params(deep_merge(read_yaml(path) or {}, over), str(path))
    changed = _flatten(over)
    if not changed:
        return changed
    yml = YAML()
    doc = yml.load(path.read_text(encoding="utf-8"))
    for dotted, value in changed.items():
        node = doc
        *parents, leaf = dotted.split(".")
        for key in parents:
            if node.get(key) is None:
                node[key] = {}
            node = node[key]
        node[leaf] = value
    with path.open("w", encoding="utf-8") as f:
        yml.dump(doc, f)
    return changed


def check_options(options: dict[str, tuple[str, Any]]) -> None:
    """Command-line options that mirror params keys, validated by the keys' own rules:
    {"evaluate.bootstrap_samples": ("--bootstrap-samples", -5), ...}. One problem per line,
    each naming the option and the key whose rule it broke."""
    from typing import Annotated

    from pydantic import TypeAdapter

    problems = []
    for key, (option, value) in options.items():
        section, field = key.split(".")
        info = Params.model_fields[section].annotation.model_fields[field]
        try:
            TypeAdapter(Annotated[info.annotation, info]).validate_python(value)
        except ValidationError as err:
            problems += [f"{option}: {e['msg']} (got {SHORT.repr(value)}; the rule of {key})"
                         for e in err.errors()]
    if problems:
        raise ConfigError("command line", problems)


def lookup(raw: Any, key: str) -> tuple[bool, Any]:
    """(present, value) of a dotted key (train.learning_rate) in params as read from YAML."""
    node = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def missing_dvc_params(raw: dict[str, Any], dvc_file: Path = Path("dvc.yaml")) -> dict[str, list[str]]:
    """Each key dvc.yaml's stages list under `params:` that `raw` (a params file as read)
    does not set, with the stages that read it. A default in the schema does not count:
    DVC refuses to run a stage whose listed key is missing."""
    if not dvc_file.is_file():
        return {}
    readers: dict[str, list[str]] = {}
    for stage, spec in (yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}).get("stages", {}).items():
        for key in spec.get("params") or []:
            if isinstance(key, str):  # {file: [keys]} entries read other files
                readers.setdefault(key, []).append(stage)
    return {key: stages for key, stages in readers.items() if not lookup(raw, key)[0]}


def check_dvc_params(raw: dict[str, Any], source: str, dvc_file: Path = Path("dvc.yaml")) -> None:
    """Every key dvc.yaml's stages list under `params:` is set in `raw` (the params file
    `source`, as read)."""
    problems = [f"{key}: not set, and dvc.yaml's {', '.join(stages)} stage(s) read it (DVC will not run "
                f"them without it): `finetune check --fill` writes it with its default "
                f"(`finetune check --explain {key}` says what it is)"
                for key, stages in missing_dvc_params(raw, dvc_file).items()]
    if problems:
        raise ConfigError(source, problems)


def fill_dvc_params(path: Path, dvc_file: Path = Path("dvc.yaml")) -> list[str]:
    """Write into the params file each key dvc.yaml names that it leaves out, with the
    schema's default (what the stages would use anyway), keeping its comments; returns the
    keys written. A file that is invalid otherwise is refused, and nothing is written."""
    raw = read_yaml(path) or {}
    defaults = parse_params(raw, str(path)).model_dump(mode="json")
    fill: dict[str, Any] = {}
    for key in missing_dvc_params(raw, dvc_file):
        *parents, leaf = key.split(".")
        node = fill
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = lookup(defaults, key)[1]
    return sorted(apply_overrides(path, fill)) if fill else []
