"""Everything written about a param, generated from its pydantic field in tasks/config/.

The field's `description` (and its type, bounds, allowed values and default) is the one
source. From it this module writes:

- `docs/reference/params.md`: one table per section (key, type, default, meaning);
- `params.schema.json`: the JSON Schema of params.yaml, which editors read through the first
  line of params.yaml and examples/*.yaml (`# yaml-language-server: $schema=...`);
- the inline comment of every key in params.yaml: the first sentence of its description
  (plus the allowed values it does not name). Only comments change, never a value, so
  dvc.lock's params hashes stay as they are;

and `finetune check --explain KEY` prints one field. tests/test_docs.py fails when a written
file differs from what this module would write.

    python -m tasks.schema_docs            # (= make docs-reference) rewrite them all
    python -m tasks.schema_docs --check    # list the stale files, exit 1 if any
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tasks.config import Params, lookup
from tasks.errors import PipelineError

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "params.yaml"
SCHEMA = ROOT / "params.schema.json"
REFERENCE = ROOT / "docs" / "reference" / "params.md"
EXAMPLES = ROOT / "examples"
COMMAND = "python -m tasks.schema_docs (make docs-reference)"
# The line editors (VS Code's YAML extension, PyCharm) read to find a YAML file's schema.
SCHEMA_LINE = "# yaml-language-server: $schema={}"
# Inline comments in params.yaml start at this column (as torchtune's configs align them).
COMMENT_COLUMN = 35
# A sentence ends at '.', '!' or '?' followed by a space and a capital: "e.g. {train..." does not.
SENTENCE_END = re.compile(r"(?<=[.!?])(?<!e\.g\.)(?<!i\.e\.)\s+(?=[A-Z])")
KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][A-Za-z0-9_]*):(?P<value>.*?)(?P<comment>\s+#.*)?$")


@dataclass(frozen=True)
class Entry:
    """One key of params.yaml: its dotted path, its JSON Schema node and what it holds."""
    key: str  # data.split.seed; list items as data.sources[].weight
    node: dict[str, Any]  # the field's JSON Schema (with $refs)
    section: bool  # a mapping of further keys (a section model)


def schema() -> dict[str, Any]:
    """params.yaml's JSON Schema, from the models (pydantic's model_json_schema)."""
    out = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "params.schema.json",
           **Params.model_json_schema()}
    out["title"] = "params.yaml"
    out["description"] = ("Parameters of the fine-tuning pipeline, generated from the fields in "
                          f"tasks/config/ by {COMMAND}. Rules that combine several keys are checked by "
                          "`finetune check` only.")
    return out


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    return defs[ref.rsplit("/", 1)[1]] if ref else node


def _models(node: dict[str, Any], defs: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The object models a field can hold, each with the suffix its keys take ('' or '[]')."""
    found = []
    for part in node.get("anyOf", node.get("oneOf", [node])):
        if "$ref" in part:
            found.append(("", _resolve(part, defs)))
        elif part.get("type") == "array" and "$ref" in part.get("items", {}):
            found.append(("[]", _resolve(part["items"], defs)))
    return found


def entries(sch: dict[str, Any] | None = None) -> list[tuple[str, dict[str, Any], list[Entry]]]:
    """Sections in params.yaml order: (dotted prefix, its model's schema, its keys). A section
    holding a model (data.split, data.path's split files, data.sources' items) is followed by
    that model's own section."""
    sch = sch or schema()
    defs = sch["$defs"]
    out: list[tuple[str, dict[str, Any], list[Entry]]] = []

    def walk(prefix: str, model: dict[str, Any]) -> None:
        rows, nested = [], []
        for name, node in model["properties"].items():
            key = f"{prefix}.{name}"
            rows.append(Entry(key, node, section="$ref" in node))
            nested += [(key + suffix, m) for suffix, m in _models(node, defs)]
        out.append((prefix, model, rows))
        for key, m in nested:
            walk(key, m)

    for name, node in sch["properties"].items():
        walk(name, _resolve(node, defs))
    return out


def all_entries() -> dict[str, Entry]:
    return {e.key: e for _, _, rows in entries() for e in rows}


def first_sentence(text: str) -> str:
    sentence = SENTENCE_END.split(" ".join(text.split()), maxsplit=1)[0]
    return sentence[:-1] if sentence.endswith(".") and not sentence.endswith("...") else sentence


def _number(v: Any) -> str:
    return json.dumps(v)


def _bounds(node: dict[str, Any]) -> str:
    lo = ("[", node["minimum"]) if "minimum" in node else ("(", node["exclusiveMinimum"]) \
        if "exclusiveMinimum" in node else None
    hi = ("]", node["maximum"]) if "maximum" in node else (")", node["exclusiveMaximum"]) \
        if "exclusiveMaximum" in node else None
    if lo and hi:
        return f" in {lo[0]}{_number(lo[1])}, {_number(hi[1])}{hi[0]}"
    if lo:
        return f" {'≥' if lo[0] == '[' else '>'} {_number(lo[1])}"
    if hi:
        return f" {'≤' if hi[0] == ']' else '<'} {_number(hi[1])}"
    return ""


def type_text(node: dict[str, Any], defs: dict[str, Any]) -> str:
    """A field's type in words: 'integer ≥ 1 or null', 'one of nf4, fp4', 'list of text'."""
    parts = node.get("anyOf", node.get("oneOf"))
    if parts:
        words = [type_text(p, defs) for p in parts]
        words.sort(key=lambda w: w == "null")  # null last
        return " or ".join(dict.fromkeys(words))
    if "$ref" in node:
        return "mapping (its keys below)"
    if "enum" in node:
        return "one of " + ", ".join(str(v) for v in node["enum"])
    if "const" in node:
        return str(node["const"])
    kind = node.get("type")
    if kind == "null":
        return "null"
    if kind == "boolean":
        return "true or false"
    if kind in ("integer", "number"):
        return kind + _bounds(node)
    if kind == "string":
        length = node.get("maxLength")
        return "one character" if length == 1 else "text"
    if kind == "array":
        item = node.get("items", {})
        if "enum" in item:
            return "list of any of " + ", ".join(str(v) for v in item["enum"])
        items = type_text(item, defs) if item else "anything"
        return f"list of {items}" + (f" (at least {node['minItems']})" if "minItems" in node else "")
    if kind == "object":
        keys = node.get("propertyNames", {}).get("enum")
        what = type_text(node.get("additionalProperties", {}), defs) if isinstance(
            node.get("additionalProperties"), dict) else "anything"
        return f"mapping of {'/'.join(keys) if keys else 'text'} to {what}"
    return "anything"


def allowed_values(node: dict[str, Any]) -> list[str]:
    """The finite set of values a field takes, where it has one (enums, consts, booleans)."""
    values: list[str] = []
    for part in node.get("anyOf", node.get("oneOf", [node])):
        values += [str(v) for v in part.get("enum", [])]
        if "const" in part:
            values.append(str(part["const"]))
        if part.get("type") == "boolean":
            values += ["true", "false"]
        if part.get("type") == "array" and "enum" in part.get("items", {}):
            values += [str(v) for v in part["items"]["enum"]]
        if part.get("type") == "null" and values:
            values.append("null")
    return values if not any(p.get("type") in ("string", "integer", "number") and "enum" not in p
                             and "const" not in p for p in node.get("anyOf", [node])) else []


def yaml_value(value: Any) -> str:
    """A value as params.yaml would write it (flow style, one line)."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1000)
    return text.strip().removesuffix("\n...").removesuffix("...").strip()


def _shipped(key: str, params: Path = PARAMS) -> tuple[bool, Any]:
    """(present, value) of a dotted key in a params file (the shipped params.yaml)."""
    return lookup(yaml.safe_load(params.read_text(encoding="utf-8")) if params.is_file() else None, key)


def default_text(entry: Entry) -> str:
    if entry.section:
        return "(section)"
    if "default" not in entry.node:
        return "required"
    return yaml_value(entry.node["default"])


def _cell(text: str) -> str:
    """Text as one markdown table cell: pipes escaped, and <type> shown, not read as HTML."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|") \
        .replace("\n", " ")


def reference() -> str:
    """docs/reference/params.md."""
    sch = schema()
    defs = sch["$defs"]
    lines = [
        "# Params reference",
        "",
        f"<!-- Generated by {COMMAND} from the field descriptions in tasks/config/: edit those, "
        "not this page. -->",
        "",
        "Every key of `params.yaml`, one table per section, generated from the pydantic models in "
        "`tasks/config/` (the same text `finetune check --explain KEY` prints and the JSON Schema "
        "`params.schema.json` gives your editor). *Default* is the value a key you leave out takes; "
        "where the shipped `params.yaml` sets another value, that value follows it. Keys of list "
        "items are written `data.sources[].weight`. Rules that combine keys are in "
        "[Writing params.yaml](../params.md#validation-rules).",
        "",
    ]
    sections = entries(sch)
    known = {e.key: e for _, _, rows in sections for e in rows}
    for prefix, model, rows in sections:
        depth = prefix.count(".")
        title = f"`{prefix}`"
        if prefix.endswith("[]"):
            title += " (each item of the list)"
        elif model.get("title") == "SplitFiles":
            title += " as split files"
        lines += [f"##{'#' * min(depth, 1)} {title}", ""]
        parent = known.get(prefix.removesuffix("[]"))
        about = model.get("description") or (parent.node.get("description") if parent
                                             else sch["properties"][prefix].get("description"))
        if about:
            lines += [_cell(about), ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for e in rows:
            default = default_text(e)
            present, value = _shipped(e.key)
            if present and not e.section and ("default" not in e.node or value != e.node["default"]):
                default = f"`{yaml_value(value)}` (params.yaml); schema: `{default}`" \
                    if default != "required" else f"required; params.yaml: `{yaml_value(value)}`"
            elif default not in ("(section)", "required"):
                default = f"`{default}`"
            kind = "section" if e.section else type_text(e.node, defs)
            lines.append(f"| `{e.key}` | {_cell(kind)} | {_cell(default)} | "
                         f"{_cell(e.node.get('description', ''))} |")
        lines.append("")
    return "\n".join(lines)


def comment_for(entry: Entry) -> str:
    """A key's inline comment in params.yaml: its description's first sentence, plus the
    allowed values that sentence does not name."""
    text = first_sentence(entry.node.get("description", ""))
    values = [v for v in allowed_values(entry.node) if v not in ("true", "false", "null")]
    missing = [v for v in values if not re.search(rf"(?<![\w.]){re.escape(v)}(?![\w])", text)]
    if missing:
        text += f" ({' | '.join(values)})"
    return text


def schema_line(path: Path) -> str:
    rel = Path(*[".."] * len(path.resolve().relative_to(ROOT).parts[:-1]), SCHEMA.name)
    return SCHEMA_LINE.format(rel.as_posix() if rel.parent != Path() else "./" + rel.name)


def with_schema_line(path: Path, text: str) -> str:
    """`text` whose first line names the schema (replacing an older such line)."""
    lines = text.split("\n")
    if lines and lines[0].startswith(SCHEMA_LINE.format("")):
        lines = lines[1:]
    return "\n".join([schema_line(path), *lines])


def commented_params(text: str) -> str:
    """params.yaml with each key's inline comment rewritten from its field (values untouched)."""
    known = all_entries()
    stack: list[str] = []
    out = []
    for line in with_schema_line(PARAMS, text).split("\n"):
        match = KEY_LINE.match(line)
        if not match:
            out.append(line)
            continue
        depth = len(match["indent"]) // 2
        stack = stack[:depth] + [match["key"]]
        entry = known.get(".".join(stack))
        if depth == 0 or entry is None:  # section headings keep their line; unknown keys fail in check
            out.append(line)
            continue
        body = f"{match['indent']}{match['key']}:{match['value'].rstrip()}"
        out.append(f"{body.ljust(COMMENT_COLUMN - 1)} # {comment_for(entry)}")
    return "\n".join(out)


def expected() -> dict[Path, str]:
    """Every generated file and the text it should hold."""
    files = {REFERENCE: reference(), SCHEMA: json.dumps(schema(), indent=2, ensure_ascii=False) + "\n",
             PARAMS: commented_params(PARAMS.read_text(encoding="utf-8"))}
    for example in sorted(EXAMPLES.glob("*.yaml")):
        files[example] = with_schema_line(example, example.read_text(encoding="utf-8"))
    return files


def stale() -> list[Path]:
    """The generated files whose text differs from what this module writes."""
    return [p for p, text in expected().items()
            if not p.is_file() or p.read_text(encoding="utf-8") != text]


def explain(key: str, params: Path = PARAMS) -> str:
    """What `finetune check --explain KEY` prints: description, type, default, allowed values
    (and the value `params` sets). A list item's key may be written data.sources.weight,
    data.sources.0.weight or data.sources[].weight."""
    sch = schema()
    known = all_entries()
    aliases = {k.replace("[]", ""): e for k, e in known.items()}
    wanted = re.sub(r"\.\d+(?=\.|$)", "", key.strip()).replace("[]", "")
    if wanted in sch["properties"]:  # a whole section
        node = sch["properties"][wanted]
        return "\n".join([wanted, f"  {node.get('description', '')}",
                          "  keys: " + ", ".join(e.key for e in known.values() if e.key.count(".") == 1
                                                 and e.key.startswith(wanted + "."))])
    entry = aliases.get(wanted)
    if entry is None:
        close = difflib.get_close_matches(wanted, list(aliases) + list(sch["properties"]), n=3)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise PipelineError(f"--explain {key}: no such key in params.yaml{hint}; "
                            "docs/reference/params.md lists every key")
    children = [e.key for e in known.values() if e.key.rsplit(".", 1)[0].removesuffix("[]") == entry.key]
    lines = [entry.key, f"  {' '.join(entry.node.get('description', '').split())}",
             f"  type: {'section' if entry.section else type_text(entry.node, sch['$defs'])}"]
    if not entry.section:
        lines.append(f"  default: {default_text(entry)}")
        present, value = _shipped(entry.key, params)
        if present:
            lines.append(f"  {params.name}: {yaml_value(value)}")
        values = allowed_values(entry.node)
        if values:
            lines.append(f"  allowed: {', '.join(values)}")
    if children:
        lines.append("  keys: " + ", ".join(children))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is stale")
    args = parser.parse_args(argv)
    if args.check:
        old = stale()
        for path in old:
            print(f"stale: {path.relative_to(ROOT)}", file=sys.stderr)
        if old:
            print(f"run {COMMAND} and commit the result", file=sys.stderr)
        return int(bool(old))
    for path, text in expected().items():
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
