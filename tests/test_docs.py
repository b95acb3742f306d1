"""One source for every param: descriptions on the pydantic fields, and everything written
about params (the reference page, params.yaml's comments, the JSON Schema, --explain)
generated from them and checked for drift; the README as a front door; the docs site built
strictly and its front page rendered in headless Chromium."""

from __future__ import annotations

import json
import re
import subprocess
import typing
from pathlib import Path

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from tasks import schema_docs
from tasks.cli import main
from tasks.config import Params

from .conftest import BIN, CHROMIUM, CHROMIUM_MISSING, REPO, chromium, env

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
README_MAX_LINES = 200


def models(model: type[BaseModel] = Params) -> set[type[BaseModel]]:
    """Every model reachable from `model`'s fields (sections, data.split, split files, sources)."""
    found = {model}
    for field in model.model_fields.values():
        stack = [field.annotation]
        while stack:
            ann = stack.pop()
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                if ann not in found:
                    found |= models(ann)
            else:
                stack += typing.get_args(ann)
    return found


def test_every_field_has_a_description():
    names = {m.__name__ for m in models()}
    assert {"DataConfig", "SplitConfig", "SplitFiles", "SourceConfig", "TrainConfig"} <= names
    missing = [f"{m.__name__}.{name}" for m in models() for name, field in m.model_fields.items()
               if not (field.description or "").strip()]
    assert not missing, f"fields without Field(description=...): {missing}"


def test_generated_files_are_current():
    stale = [str(p.relative_to(REPO)) for p in schema_docs.stale()]
    assert not stale, (f"{', '.join(stale)} differ from what the fields in tasks/config/ give: run "
                       f"{schema_docs.COMMAND} and commit the result")


def test_reference_lists_every_param_with_its_field_text():
    reference = (REPO / "docs/reference/params.md").read_text(encoding="utf-8")
    entries = schema_docs.all_entries()
    assert {"data.split.seed", "data.path.train", "data.sources[].weight", "train.report_to",
            "promote.min_gain"} <= set(entries)
    for key, entry in entries.items():
        row = next((line for line in reference.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, f"{key} has no row in docs/reference/params.md"
        assert schema_docs._cell(entry.node["description"]) in row, key


def test_reference_shows_shipped_values_that_differ_from_the_default():
    reference = (REPO / "docs/reference/params.md").read_text(encoding="utf-8")
    assert "| `tokenize.max_length` | integer ≥ 8 | `256` (params.yaml); schema: `512` |" in reference


def test_params_yaml_comments_are_the_descriptions_first_sentence():
    text = (REPO / "params.yaml").read_text(encoding="utf-8")
    entries = schema_docs.all_entries()
    stack: list[str] = []
    seen = set()
    for line in text.splitlines():
        match = schema_docs.KEY_LINE.match(line)
        if not match:
            continue
        depth = len(match["indent"]) // 2
        stack = stack[:depth] + [match["key"]]
        if depth == 0:
            continue
        key = ".".join(stack)
        assert key in entries, f"params.yaml key {key} is not a field in tasks/config/"
        comment = (match["comment"] or "").strip().removeprefix("# ")
        assert comment == schema_docs.comment_for(entries[key]), key
        seen.add(key)

    def keys(d: dict, prefix: str = "") -> set[str]:
        return {k for name, v in d.items() for k in {prefix + name} | (
            keys(v, f"{prefix}{name}.") if isinstance(v, dict) and name not in ("columns",) else set())}
    assert seen == {k for k in keys(yaml.safe_load(text)) if "." in k}  # every key under a section
    assert schema_docs.comment_for(entries["lora.bias"]) == "Which biases train (none | all | lora_only)"


def test_rewriting_comments_keeps_every_value():
    text = (REPO / "params.yaml").read_text(encoding="utf-8")
    garbled = re.sub(r"^( +\w+:.*?) +# .*$", r"\1  # stale", text, flags=re.M)  # key lines only
    assert garbled.count("# stale") >= 90
    rewritten = schema_docs.commented_params(garbled)
    assert yaml.safe_load(rewritten) == yaml.safe_load(text)
    assert rewritten == text


def test_schema_line_opens_params_and_every_example():
    assert (REPO / "params.yaml").read_text().splitlines()[0] == \
        "# yaml-language-server: $schema=./params.schema.json"
    for path in EXAMPLES:
        assert path.read_text().splitlines()[0] == "# yaml-language-server: $schema=../params.schema.json"


@pytest.fixture(scope="module")
def validator() -> jsonschema.Validator:
    schema = json.loads((REPO / "params.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("path", [REPO / "params.yaml", *EXAMPLES], ids=lambda p: p.name)
def test_json_schema_validates_shipped_params(validator, path: Path):
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}"
              for e in validator.iter_errors(yaml.safe_load(path.read_text(encoding="utf-8")))]
    assert not errors


def test_json_schema_catches_what_an_editor_should_mark(validator):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"]["learning_rte"] = 1e-4
    raw["lora"]["r"] = 0
    raw["peft"]["method"] = "qlora"
    raw["train"]["report_to"] = ["tensorbord"]
    paths = sorted(".".join(map(str, e.path)) for e in validator.iter_errors(raw))
    assert paths == ["lora.r", "peft.method", "train", "train.report_to.0"]
    hover = validator.schema["$defs"]["LoraConfig"]["properties"]["r"]["description"]
    assert hover.startswith("Adapter rank")


def test_explain_prints_description_type_default_and_values(capsys):
    assert main(["check", "--explain", "peft.method"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("peft.method\n  The PEFT method;")
    assert "  type: one of lora, dora," in out and "  default: lora" in out
    assert "  allowed: lora, dora, adalora, loha, lokr, ia3, prompt_tuning, prefix_tuning, p_tuning" in out
    assert main(["check", "--explain", "data.sources.0.weight"]) == 0
    assert capsys.readouterr().out.startswith("data.sources[].weight\n  This source's share")


def test_explain_unknown_key_is_one_clear_error(capsys):
    assert main(["check", "--explain", "train.learning_rte"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("finetune check: error: --explain train.learning_rte: no such key")
    assert "'train.learning_rate'" in err and "Traceback" not in err


def test_readme_is_a_front_door():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < README_MAX_LINES
    for needed in ("make run", "make test", "## Switch to a real model and dataset",
                   "## Three ways to run it", "dvc repro", "python -m flows.finetune",
                   "prefect deployment run finetune/nightly", "make docs"):
        assert needed in readme, needed
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    assert any(link.startswith("docs/") for link in links)
    missing = [link for link in links if not (REPO / link).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The docs site, built as `make docs` builds it (--strict: a warning fails)."""
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([str(BIN / "mkdocs"), "build", "--strict", "--site-dir", str(out)], cwd=REPO,
                          env={**env(), "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def test_docs_build_strict_holds_every_page(site):
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]
    pages = set(re.findall(r"'([\w/.-]+\.md)'", str(nav)))
    assert pages == {str(p.relative_to(REPO / "docs")) for p in (REPO / "docs").rglob("*.md")}
    for page in pages:
        built = site / ("index.html" if page == "index.md" else page.removesuffix(".md") + "/index.html")
        assert built.is_file(), page
    reference = (site / "reference/params/index.html").read_text(encoding="utf-8")
    assert "data.sources[].weight" in reference
    # BENCHMARKS.md stays at the root; the page includes it (pymdownx.snippets), numbers and all.
    benchmarks = (site / "benchmarks/index.html").read_text(encoding="utf-8")
    assert "GPU check" in benchmarks and "--8&lt;--" not in benchmarks and "--8<--" not in benchmarks


@pytest.mark.skipif(CHROMIUM is None, reason=CHROMIUM_MISSING)
def test_front_page_renders_in_chromium(site, tmp_path):
    dom = chromium(["--dump-dom", (site / "index.html").as_uri()], tmp_path)
    assert "<title>finetune-pipeline</title>" in dom
    assert "Quickstart" in dom and "0.551" in dom  # the page body
    for entry in ("Params reference", "Run on Prefect", "When things go wrong"):  # the nav
        assert entry in dom, entry
    assert "fonts.googleapis.com" not in dom
