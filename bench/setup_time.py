"""`make setup` cold (empty package caches) and warm (caches filled, new .venv), for this
checkout and a baseline git revision, in one run. One JSON line each, then the ratios.

    python bench/setup_time.py                     # baseline: 29ff4ac (pip, version ranges)
    python bench/setup_time.py --baseline REV

Each variant runs in its own `git clone` of this repository (the working tree's changes are
committed to a temporary branch in the clone), with its own empty PIP_CACHE_DIR and
UV_CACHE_DIR for the cold run; the warm run deletes .venv and runs `make setup` again with
the caches the cold run filled. Downloads come from PyPI, so cold times depend on the
network of the moment: compare the two variants of one run, not runs of different days.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BASELINE = "29ff4ac"  # the last commit before the lock: pip, version ranges


def sh(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} in {cwd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def checkout(root: Path, rev: str | None) -> Path:
    """A clone at `rev`, or at this working tree (uncommitted changes included) for None."""
    dst = root / (rev or "worktree")
    sh(["git", "clone", "-q", str(REPO), str(dst)], root)
    if rev:
        sh(["git", "checkout", "-q", rev], dst)
        return dst
    files = subprocess.run(["git", "ls-files", "-m", "-o", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dst / f)
    return dst


def measure(root: Path, rev: str | None) -> dict[str, float]:
    ws = checkout(root, rev)
    caches = root / f"cache-{rev or 'worktree'}"
    env = {**os.environ, "PIP_CACHE_DIR": str(caches / "pip"), "UV_CACHE_DIR": str(caches / "uv")}
    env.pop("VIRTUAL_ENV", None)
    cold = sh(["make", "setup"], ws, env)
    shutil.rmtree(ws / ".venv")
    warm = sh(["make", "setup"], ws, env)
    return {"cold_s": round(cold, 1), "warm_s": round(warm, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=DEFAULT_BASELINE)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="finetune-setup-bench-"))
    try:
        results = {}
        for name, rev in (("baseline", args.baseline), ("ours", None)):
            results[name] = measure(root, rev)
            print(json.dumps({"name": f"setup-{name}", "rev": rev or "working tree", **results[name]}),
                  flush=True)
        print(json.dumps({"name": "setup-ratio", **{k: round(results["ours"][k] / results["baseline"][k], 3)
                                                    for k in ("cold_s", "warm_s")}}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
