"""The code's structure, read from the source (scripts/import_graph.py, stdlib `ast` only).

Fast (a few seconds) and torch-free: nothing here imports the stage modules; the one check
that runs code (no heavy imports for light commands) does it in a subprocess.

- dvc.yaml's deps under tasks/ for each stage are exactly the files `finetune <stage>` can
  import, so a change to shared code reruns every stage that runs it, and only those.
- A stage module imports no other stage module: shared code lives in lower modules.
- `finetune check` imports none of torch, transformers, peft, trl, datasets; `finetune score`
  no torch.
- The import graph does not get deeper.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from .conftest import copy_workspace

REPO = Path(__file__).resolve().parents[1]


def _load_import_graph():
    spec = importlib.util.spec_from_file_location("import_graph", REPO / "scripts" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


graph = _load_import_graph()

# Files under tasks/ that run without being imported: loaded by path, so no import names them.
# loader module -> the files it loads. A stage whose code includes the loader must list them in
# its dvc.yaml deps (a change to them changes the stage's results) and only such a stage may.
#   tasks/scoring.py: evaluate.load(str(METRIC_DIR)) with METRIC_DIR = Path(__file__).parent /
#   "metrics" / "rouge": the pinned local copy of the ROUGE metric (rouge_metric()).
LOADED_BY_PATH: dict[str, set[str]] = {
    "tasks/scoring.py": {"tasks/metrics/rouge/rouge.py"},
}

# Modules that may import stage modules: they dispatch to them.
#   tasks/cli.py: `finetune <stage>` runs the stage's run() (train's launch() for several
#   processes). tasks/stages.py: the stage table, each entry importing its stage when it runs.
DISPATCHERS = {"tasks/cli.py", "tasks/stages.py"}

# Imported by a light command, they take seconds and gigabytes; `finetune check` must not.
HEAVY = ("torch", "transformers", "peft", "trl", "datasets")

# The number of layers of the import graph (scripts/import_graph.py: a module importing no
# project module is on layer 0, any other on 1 + the highest layer it imports; a cycle is one
# node; the implicit import of a parent package's __init__.py is no edge). 11 at a56acad
# (12 counting that implicit import), 9 since stages stopped importing stages: the bound fails
# a change that makes the graph deeper than today.
MAX_LAYERS = 10


def _dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


STAGES = list(_dvc_stages())


def _stage_module(stage: str) -> Path | None:
    for candidate in (REPO / "tasks" / f"{stage}.py", REPO / "tasks" / stage / "__init__.py"):
        if candidate.is_file():
            return candidate.resolve()
    return None


def _rel(path: Path) -> str:
    return graph.rel(path, REPO)


def _python_files(folder: Path) -> set[str]:
    return {_rel(p) for p in folder.rglob("*.py") if "__pycache__" not in p.parts}


def _task_deps(stage: dict) -> tuple[dict[str, str], list[str]]:
    """dvc.yaml's deps of a stage under tasks/, as {file: the dep that names it} (a folder dep
    stands for each .py file under it), and the deps there that do not exist."""
    files: dict[str, str] = {}
    missing: list[str] = []
    for dep in stage.get("deps") or []:
        for name in ([dep] if isinstance(dep, str) else list(dep)):
            name = os.path.normpath(name).replace(os.sep, "/")
            if name != "tasks" and not name.startswith("tasks/"):
                continue
            path = REPO / name
            if path.is_dir():
                for f in _python_files(path):
                    files.setdefault(f, name)
            elif path.exists():
                files.setdefault(name, name)
            else:
                missing.append(name)
    return files, missing


def _chain(start: Path, target: str) -> str:
    steps = graph.chain(start, REPO / target, REPO)
    out = _rel(steps[0])
    for prev, nxt in itertools.pairwise(steps):
        parent = nxt in graph.parent_packages(prev, REPO) and nxt not in graph.imports(prev, REPO)
        out += f" -> {_rel(nxt)}" + (" (its package)" if parent else "")
    return out


def test_import_graph_reads_every_import_form(tmp_path):
    """scripts/import_graph.py on a made-up tree: each import form, parent packages, cycles."""
    files = {
        "tasks/__init__.py": "X = 1\n",
        "tasks/a.py": "import tasks.pkg.b\n",
        "tasks/pkg/__init__.py": "from . import c\n",
        "tasks/pkg/b.py": "def f():\n    from .c import g\n",
        "tasks/pkg/c.py": "from tasks import X, d\nfrom tasks.pkg import b\n",
        "tasks/d.py": "import importlib\nimportlib.import_module('tasks.e')\n",
        "tasks/e.py": "from tasks.d import nothing\n",
        "tasks/ns/loaded.py": "import os\n",
        "flows/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    t = tmp_path / "tasks"

    def names(paths):
        return sorted(graph.rel(p, tmp_path) for p in paths)

    assert names(graph.imports(t / "a.py", tmp_path)) == ["tasks/pkg/b.py"]
    assert names(graph.imports(t / "pkg/__init__.py", tmp_path)) == ["tasks/pkg/c.py"]
    assert names(graph.imports(t / "pkg/b.py", tmp_path)) == ["tasks/pkg/c.py"]
    # X is a name (tasks/__init__.py), d a submodule; b a submodule of the package
    assert names(graph.imports(t / "pkg/c.py", tmp_path)) == ["tasks/__init__.py", "tasks/d.py",
                                                                "tasks/pkg/b.py"]
    assert names(graph.closure(t / "a.py", tmp_path)) == [
        "tasks/__init__.py", "tasks/a.py", "tasks/d.py", "tasks/e.py", "tasks/pkg/__init__.py",
        "tasks/pkg/b.py", "tasks/pkg/c.py"]
    assert names(graph.closure(t / "ns/loaded.py", tmp_path)) == ["tasks/__init__.py", "tasks/ns/loaded.py"]
    assert [names(c) for c in graph.cycles(tmp_path)] == [["tasks/d.py", "tasks/e.py"],
                                                          ["tasks/pkg/b.py", "tasks/pkg/c.py"]]
    layer = {graph.rel(p, tmp_path): n for p, n in graph.layers(tmp_path).items()}
    # the cycle d <-> e imports nothing else: one node on layer 0
    assert layer == {"flows/__init__.py": 0, "tasks/__init__.py": 0, "tasks/ns/loaded.py": 0,
                     "tasks/d.py": 0, "tasks/e.py": 0, "tasks/pkg/b.py": 1, "tasks/pkg/c.py": 1,
                     "tasks/a.py": 2, "tasks/pkg/__init__.py": 2}


def test_loaded_by_path_is_current():
    """LOADED_BY_PATH is still true: each loader exists and names its files' folders."""
    problems = []
    for loader, loaded in LOADED_BY_PATH.items():
        if not (REPO / loader).is_file():
            problems.append(f"{loader} (LOADED_BY_PATH) does not exist")
            continue
        source = (REPO / loader).read_text()
        for f in sorted(loaded):
            if not (REPO / f).is_file():
                problems.append(f"{f} (LOADED_BY_PATH, loaded by {loader}) does not exist")
                continue
            folder = os.path.relpath(REPO / f, (REPO / loader).parent).replace(os.sep, "/")
            parts = Path(folder).parent.parts
            if not all(f'"{part}"' in source or f"'{part}'" in source or f"/{part}" in source
                       for part in parts if part != ".."):
                problems.append(f"{loader} no longer names {'/'.join(parts)}: does it still load {f}? "
                                "update LOADED_BY_PATH in tests/test_structure.py")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_match_imports(stage):
    """dvc.yaml's deps under tasks/ == the import closure of tasks/<stage>.py (plus the files
    its loaders load by path)."""
    module = _stage_module(stage)
    if module is None:
        pytest.fail(f"dvc.yaml's stage {stage} has no module tasks/{stage}.py", pytrace=False)
    code = {_rel(p) for p in graph.closure(module, REPO)}
    loaded = {f: loader for loader, files in LOADED_BY_PATH.items() if loader in code for f in files}
    deps, nonexistent = _task_deps(_dvc_stages()[stage])

    problems = []
    for f in sorted(code - set(deps)):
        problems.append(f"{f} is imported by {stage}'s code but not in dvc.yaml's deps for {stage} "
                        f"({_chain(module, f)})")
    for f in sorted(set(loaded) - set(deps)):
        problems.append(f"{f} is loaded by path by {loaded[f]} (in {stage}'s code) but not in "
                        f"dvc.yaml's deps for {stage}")
    for f in sorted(set(deps) - code - set(loaded)):
        via = "" if deps[f] == f else f" (through the dep {deps[f]})"
        loaders = [loader for loader, files in LOADED_BY_PATH.items() if f in files]
        why = (f"; it is loaded by {', '.join(loaders)}, which {stage}'s code does not import"
               if loaders else "")
        problems.append(f"{f} is in dvc.yaml's deps for {stage}{via} but {stage}'s code does not "
                        f"import it{why}")
    for name in nonexistent:
        problems.append(f"{name} is in dvc.yaml's deps for {stage} but does not exist")
    if problems:
        pytest.fail(f"dvc.yaml's deps for {stage} differ from {_rel(module)}'s import closure:\n  "
                    + "\n  ".join(problems), pytrace=False)


def test_stage_table_is_dvc_yaml():
    """One stage list: the CLI, the flow and the tests read tasks/stages.py, dvc.yaml runs
    `finetune <stage>` for the same names in the same order."""
    from tasks.stages import STAGES

    position = list(STAGES).index
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(STAGES) == list(declared)
    assert all(declared[name]["cmd"] == f"finetune {name}" for name in STAGES)

    # The flow runs the table in order: each stage comes after the stages whose outputs it reads.
    def paths(entries: list) -> list[str]:
        return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]

    made_by = {out: name for name in STAGES for key in ("outs", "metrics")
               for out in paths(declared[name].get(key))}
    for i, name in enumerate(STAGES):
        for dep in paths(declared[name]["deps"]):
            maker = next((made_by[o] for o in made_by if dep == o or dep.startswith(o + "/")), None)
            assert maker is None or position(maker) < i, f"{name} reads {dep} of {maker}, which runs later"


def test_stages_do_not_import_stages():
    """A stage module imports no other stage module, and only the dispatchers import stages:
    what two stages share lives in a lower module."""
    stage_files = {_rel(m): s for s in STAGES if (m := _stage_module(s)) is not None}
    problems = []
    for f in sorted(_python_files(REPO / "tasks")):
        if f in DISPATCHERS:
            continue
        kind = f"stage {stage_files[f]}" if f in stage_files else "not a stage"
        for target, lines in sorted(graph.import_lines(REPO / f, REPO).items()):
            t = _rel(target)
            if t in stage_files and t != f:
                where = ", ".join(f"{f}:{n}" for n in lines)
                problems.append(f"{f} ({kind}) imports stage {stage_files[t]} ({t}) at {where}")
    if problems:
        pytest.fail("stage modules imported outside the dispatchers "
                    f"({', '.join(sorted(DISPATCHERS))}):\n  " + "\n  ".join(problems), pytrace=False)


# Run before the code under test: records, for each heavy package, the project frames that
# imported it first, and at exit (even through sys.exit) writes which heavy packages loaded.
_PROLOGUE = textwrap.dedent('''
    import atexit, json, os, sys, traceback
    _HEAVY, _REPO, _OUT = {heavy!r}, {repo!r}, {out!r}
    _first = {{}}

    class _Watch:
        def find_spec(self, name, path=None, target=None):
            top = name.partition(".")[0]
            if top in _HEAVY and top not in _first:
                _first[top] = [f"{{os.path.relpath(fr.filename, _REPO)}}:{{fr.lineno}}"
                               for fr in traceback.extract_stack()[:-1]
                               if fr.filename.startswith(_REPO) and "/.venv/" not in fr.filename]
            return None

    sys.meta_path.insert(0, _Watch())

    @atexit.register
    def _report():
        loaded = sorted({{m.partition(".")[0] for m in sys.modules}} & set(_HEAVY))
        with open(_OUT, "w") as fh:
            json.dump({{"loaded": loaded, "first": {{k: _first.get(k, []) for k in loaded}}}}, fh)
''')


def assert_no_heavy_imports(code: str, cwd: Path, heavy: tuple[str, ...] = HEAVY,
                            env: dict[str, str] | None = None, timeout: float = 120) -> None:
    """Runs `code` in a fresh interpreter in `cwd` (the repository on PYTHONPATH) and fails
    if any of `heavy` got imported, naming where from; also fails if `code` fails."""
    out = Path(cwd) / f".heavy-imports-{os.getpid()}.json"
    prologue = _PROLOGUE.format(heavy=tuple(heavy), repo=str(REPO), out=str(out))
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run([sys.executable, "-c", prologue + "\n" + code], check=False, cwd=cwd,
                              env=full_env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{code!r} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        report = json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)
    if report["loaded"]:
        lines = [f"{name}: first imported via {' <- '.join(reversed(report['first'][name])) or '?'}"
                 for name in report["loaded"]]
        pytest.fail(f"{code!r} imported {', '.join(report['loaded'])}:\n  " + "\n  ".join(lines),
                    pytrace=False)


def test_check_imports_no_heavy_packages():
    """`finetune check` (and --explain) validate params.yaml without torch: one interpreter
    runs both, so the check costs one start-up."""
    assert_no_heavy_imports("from tasks.cli import main\n"
                            "assert main(['check']) == 0\n"
                            "assert main(['check', '--explain', 'train.learning_rate']) == 0", REPO)


def test_stages_without_a_model_import_no_heavy_packages(trained_workspace, tmp_path):
    """prepare (a built-in template needs no tokenizer), align when disabled and promote when
    the stored scores are reused (the shipped champion rule, on the session's trained
    workspace) run without torch, and without the `evaluate` package, which imports it."""
    ws = copy_workspace(trained_workspace, tmp_path / "ws")
    assert_no_heavy_imports("from tasks.cli import main\n"
                            "for stage in ('prepare', 'align', 'promote'):\n"
                            "    assert main([stage]) == 0, stage", ws, heavy=(*HEAVY, "evaluate"))


def test_score_imports_no_torch(tmp_path):
    """`finetune score` computes ROUGE through the `evaluate` package (which loads datasets)
    but no torch: evaluate's model evaluators, which would import it, are not loaded."""
    (tmp_path / "p.txt").write_text("the cat sat\na dog ran\n")
    (tmp_path / "r.txt").write_text("the cat sat down\na dog ran off\n")
    assert_no_heavy_imports("from tasks.cli import main\n"
                            "assert main(['score', '--predictions', 'p.txt', '--references', 'r.txt',"
                            " '--bootstrap-samples', '20']) == 0", tmp_path, heavy=("torch", "peft", "trl"))


def test_stage_processes_load_no_inductor(tmp_path):
    """bitsandbytes wraps its kernels in torch.compile when imported; in a stage process
    (torch.compile off, tasks/__init__.py) torch.compile hands back the plain function and
    TorchInductor, 2-3 s of imports, is not loaded."""
    code = ("import sys, tasks, peft\n"
            "from bitsandbytes.backends.default import ops\n"
            "f = ops._dequantize_4bit_compute  # bnb's fallback wrapper around torch.compile(fn)\n"
            "cells = dict(zip(f.__code__.co_freevars, (c.cell_contents for c in f.__closure__)))\n"
            "assert cells['compiled_fn'] is f.__wrapped__, 'compiled'\n"
            "assert 'torch._inductor.compile_fx' not in sys.modules, 'inductor loaded'")
    env = {k: v for k, v in os.environ.items() if k != "TORCHDYNAMO_DISABLE"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_import_graph_depth():
    layer = graph.layers(REPO)
    count = max(layer.values()) + 1
    listing = [f"layer {n}: " + ", ".join(sorted(_rel(m) for m, v in layer.items() if v == n))
               for n in range(count)]
    listing += ["cycle (one node): " + ", ".join(_rel(m) for m in c) for c in graph.cycles(REPO)]
    print(f"{count} layers\n" + "\n".join(listing))
    assert count < MAX_LAYERS, (f"the import graph has {count} layers, at most {MAX_LAYERS - 1} allowed:\n"
                                + "\n".join(listing))
