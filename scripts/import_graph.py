"""The project's import graph, read from the source with `ast` (nothing is imported).

    python scripts/import_graph.py                 # the layers: how deep the graph is
    python scripts/import_graph.py --stage train   # the files `finetune train` can run

Every `.py` file under tasks/ and flows/ is a module (tasks/metrics/rouge/rouge.py too, though
nothing imports it). Every import of a project module counts, wherever it is in the file: at
module level, inside a function, under `if TYPE_CHECKING:`, in a `try:`. Forms understood:

    import tasks.x [as y]          -> tasks/x.py (tasks/x/__init__.py for a package)
    from tasks import x, y         -> tasks/x.py when x is a submodule (tasks/x.py or
                                      tasks/x/__init__.py exists), else tasks/__init__.py
                                      (x is then a name defined there)
    from tasks.x import y          -> tasks/x.py, plus tasks/x/y.py when y is a submodule
    from . import x / from .x import y   resolved against the file's own package
    importlib.import_module("tasks.x")   only with a literal string; an f-string such as
                                      tasks/cli.py's f"tasks.{args.command}" cannot be read

`imports(path)` gives the modules a file names directly. Importing tasks.a.b also runs
tasks/__init__.py and tasks/a/__init__.py: `closure(path)` adds those parent packages (of the
file itself and of everything it reaches) and follows them too.

`layers()`: a module that imports no project module is on layer 0, any other one is on
1 + the highest layer of what it imports (edges are `imports()`, not the implicit parent
packages). A cycle (a strongly connected component) is one node: all its members share a
layer, and `cycles()` lists them.
"""

from __future__ import annotations

import argparse
import ast
import functools
import sys
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Top-level folders whose modules are the project's (each a package: they hold __init__.py).
PACKAGES = ("tasks", "flows")


def _root(root: Path | None) -> Path:
    return _resolved(root or REPO)


@functools.cache
def _resolved(path: Path) -> Path:
    return path.resolve()


def _abs(path: Path | str, root: Path) -> Path:
    path = Path(path)
    path = path if path.is_absolute() else root / path
    try:
        path.relative_to(root)
        return path  # already under the resolved root
    except ValueError:
        return path.resolve()


def rel(path: Path, root: Path | None = None) -> str:
    """`path` relative to the repository, with forward slashes (as dvc.yaml writes it)."""
    root = _root(root)
    path = Path(path)
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.resolve().relative_to(root).as_posix()


def modules(root: Path | None = None) -> list[Path]:
    """Every .py file under the project's packages, sorted."""
    root = _root(root)
    found = []
    for package in PACKAGES:
        found += [p for p in (root / package).rglob("*.py") if "__pycache__" not in p.parts]
    return sorted(found)


def module_name(path: Path, root: Path | None = None) -> str:
    """tasks/config/__init__.py -> tasks.config, tasks/io.py -> tasks.io."""
    parts = list(Path(rel(path, root)).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_file(name: str, root: Path | None = None) -> Path | None:
    """The file `import name` runs: a/b.py or a/b/__init__.py; None for a namespace package
    (a folder without __init__.py) or for a name that is no project module."""
    root = _root(root)
    parts = name.split(".")
    if not parts or parts[0] not in PACKAGES:
        return None
    base = root.joinpath(*parts)
    for candidate in (base.with_name(base.name + ".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_module(name: str, root: Path) -> bool:
    """Whether `name` is a project module or package (a namespace folder counts)."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return False
    base = root.joinpath(*parts)
    return base.with_name(base.name + ".py").is_file() or base.is_dir()


def parent_packages(path: Path, root: Path | None = None) -> list[Path]:
    """The __init__.py files that run before `path` does: tasks/a/b.py -> tasks/__init__.py,
    tasks/a/__init__.py (the ones that exist; a namespace folder has none). A package's own
    __init__.py is not its own parent."""
    root = _root(root)
    parts = module_name(path, root).split(".")
    found = []
    for i in range(1, len(parts)):
        init = root.joinpath(*parts[:i], "__init__.py")
        if init.is_file():
            found.append(init)
    return found


def _package_of(path: Path, root: Path) -> list[str]:
    """The package a file's relative imports start from."""
    parts = module_name(path, root).split(".")
    return parts if path.name == "__init__.py" else parts[:-1]


def import_sites(path: Path | str, root: Path | None = None) -> list[tuple[int, str]]:
    """(line, dotted name) of each project module `path` imports, anywhere in the file, in
    line order. `from tasks import paths` gives tasks.paths; `from tasks import NAME` (a name
    defined in tasks/__init__.py) gives tasks; `from tasks.io import f` gives tasks.io."""
    root = _root(root)
    path = _abs(path, root)
    stat = path.stat()
    key = (path, root, stat.st_mtime_ns, stat.st_size)
    if key not in _SITES:
        _SITES[key] = _import_sites(path, root)
    return list(_SITES[key])


# import_sites() of each file, while it is unchanged: the graph functions ask again and again.
_SITES: dict[tuple[Path, Path, int, int], list[tuple[int, str]]] = {}


def _import_sites(path: Path, root: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    sites: list[tuple[int, str]] = []

    def add_from(line: int, base: str, aliases: Iterable[ast.alias]) -> None:
        if not _is_module(base, root):
            return
        names_only = False  # whether some alias is a name defined in base, not a submodule
        for alias in aliases:
            if alias.name != "*" and _is_module(f"{base}.{alias.name}", root):
                sites.append((line, f"{base}.{alias.name}"))
            else:
                names_only = True
        # base itself: a plain module (tasks.io) always; a package's __init__.py only when a
        # name comes from it (from tasks import paths runs tasks/__init__.py as paths's parent
        # package, which closure() adds, but names nothing in it)
        if names_only or module_file(base, root) not in (None, root.joinpath(*base.split("."), "__init__.py")):
            sites.append((line, base))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_module(alias.name, root):
                    sites.append((node.lineno, alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _package_of(path, root)
                up = node.level - 1
                if up > len(package) - 1:
                    continue  # beyond the top-level package: Python would refuse it too
                anchor = package[:len(package) - up]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            add_from(node.lineno, base, node.names)
        elif isinstance(node, ast.Call):
            func = node.func
            called = (func.attr if isinstance(func, ast.Attribute) else
                      func.id if isinstance(func, ast.Name) else None)
            if (called in ("import_module", "__import__") and node.args
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                    and _is_module(node.args[0].value, root)):
                sites.append((node.lineno, node.args[0].value))
    return sorted(set(sites))


def import_lines(path: Path | str, root: Path | None = None) -> dict[Path, list[int]]:
    """imports(path) with the lines that import each file."""
    root = _root(root)
    path = _abs(path, root)
    stat = path.stat()
    key = (path, root, stat.st_mtime_ns, stat.st_size)
    if key not in _LINES:
        out: dict[Path, list[int]] = {}
        for line, name in import_sites(path, root):
            target = module_file(name, root)
            if target is not None and target != path:
                out.setdefault(target, []).append(line)
        _LINES[key] = out
    return {target: list(lines) for target, lines in _LINES[key].items()}


# Per file, while it is unchanged (the graph functions ask again and again). A file added
# later that turns `from tasks import x` from a name into a submodule needs clear_cache().
_LINES: dict[tuple[Path, Path, int, int], dict[Path, list[int]]] = {}


def clear_cache() -> None:
    _SITES.clear()
    _LINES.clear()


def imports(path: Path | str, root: Path | None = None) -> set[Path]:
    """The project-module files `path` imports directly (not the implicit parent packages).

    `from tasks import paths` names tasks/paths.py; `from tasks import NAME` for a name defined
    in tasks/__init__.py names tasks/__init__.py. A namespace package (a folder without
    __init__.py) has no file and adds nothing. A file importing itself is left out."""
    return set(import_lines(path, root))


def _graph(root: Path) -> dict[Path, set[Path]]:
    return {m: imports(m, root) for m in modules(root)}


def closure(path: Path | str, root: Path | None = None) -> set[Path]:
    """Every project file that importing `path` can run: itself, what it imports (at any
    depth) and the parent packages' __init__.py of each of those."""
    return set(_reach(path, root))


def _reach(path: Path | str, root: Path | None = None) -> dict[Path, Path | None]:
    """closure() as {file: the file that brought it in (None for `path`)}, breadth first, so
    `chain()` gives a shortest way in."""
    root = _root(root)
    start = _abs(path, root)
    came_from: dict[Path, Path | None] = {start: None}
    queue = [start]
    while queue:
        current = queue.pop(0)
        for nxt in sorted(imports(current, root)) + parent_packages(current, root):
            if nxt not in came_from:
                came_from[nxt] = current
                queue.append(nxt)
    return came_from


def chain(path: Path | str, target: Path | str, root: Path | None = None) -> list[Path]:
    """A shortest import chain from `path` to `target` (both included); [] if it is not reached."""
    root = _root(root)
    came_from = _reach(path, root)
    node: Path | None = _abs(target, root)
    if node not in came_from:
        return []
    out = []
    while node is not None:
        out.append(node)
        node = came_from[node]
    return out[::-1]


def _sccs(graph: dict[Path, set[Path]]) -> list[list[Path]]:
    """Tarjan's strongly connected components, iteratively (sinks first)."""
    index: dict[Path, int] = {}
    low: dict[Path, int] = {}
    stack: list[Path] = []
    on_stack: set[Path] = set()
    out: list[list[Path]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            for nxt in it:
                if nxt not in graph:
                    continue
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    out.append(sorted(component))
    return out


def cycles(root: Path | None = None) -> list[list[Path]]:
    """The import cycles: strongly connected components of more than one module."""
    return [c for c in _sccs(_graph(_root(root))) if len(c) > 1]


def layers(root: Path | None = None) -> dict[Path, int]:
    """Each module's layer: 0 when it imports no project module, else 1 + the highest layer
    of what it imports. The members of a cycle are one node and share its layer."""
    graph = _graph(_root(root))
    layer: dict[Path, int] = {}
    for component in _sccs(graph):  # Tarjan emits a component after everything it reaches
        members = set(component)
        below = {dep for m in component for dep in graph[m]} - members
        value = 1 + max(layer[d] for d in below) if below else 0
        for m in component:
            layer[m] = value
    return layer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", metavar="NAME", help="print the closure of tasks/NAME.py")
    parser.add_argument("--root", type=Path, default=REPO, help="the repository (default: this one)")
    args = parser.parse_args(argv)
    root = _root(args.root)
    if args.stage:
        target = root / "tasks" / f"{args.stage}.py"
        if not target.is_file():
            target = root / "tasks" / args.stage / "__init__.py"
        if not target.is_file():
            print(f"no tasks/{args.stage}.py", file=sys.stderr)
            return 2
        for p in sorted(rel(f, root) for f in closure(target, root)):
            print(p)
        return 0
    layer = layers(root)
    count = max(layer.values()) + 1 if layer else 0
    print(f"{count} layers ({len(layer)} modules)")
    for n in range(count):
        print(f"layer {n}: " + ", ".join(sorted(rel(m, root) for m, v in layer.items() if v == n)))
    for component in cycles(root):
        print("cycle (one node): " + ", ".join(rel(m, root) for m in component))
    return 0


if __name__ == "__main__":
    sys.exit(main())
