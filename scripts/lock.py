"""Write requirements/lock.txt: every dependency pinned with hashes, for Python 3.11-3.13.

`make lock` runs this after pyproject.toml changes (existing pins are kept where they still
fit); `make upgrade` runs it with --upgrade to move every pin to the newest release;
`make lock LOCK_ARGS='-P transformers==5.23.0'` moves one package.

torch and the CUDA runtime it pulls in (triton, nvidia-*, cuda-*) are left out of the lock on
purpose: one wheel cannot serve both CPU hosts (the small CPU build) and GPU hosts (PyPI's
CUDA build). requirements/torch.txt pins torch's version; the resolution here is made against
that pin, so everything in the lock is known to work with it.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "lock.txt"
TORCH = ROOT / "requirements" / "torch.txt"
LOWEST_PYTHON = "3.11"
# Packages whose wheels differ between CPU and CUDA hosts: installed with torch, not locked.
TORCH_BUILD = re.compile(r"^(torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)$")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==")


def uv() -> str:
    here = Path(sys.executable).parent / "uv"
    found = str(here) if here.exists() else shutil.which("uv")
    if found is None:
        sys.exit("lock: uv is not installed; run `make setup` (or `pip install uv`) first")
    return found


def compile_(out: Path, *extra: str) -> None:
    cmd = [
        uv(), "pip", "compile", str(ROOT / "pyproject.toml"), "--extra", "dev", "--universal",
        "--python-version", LOWEST_PYTHON, "--constraint", str(TORCH),
        "--custom-compile-command", "make lock", "--quiet", "-o", str(out), *extra,
    ]
    subprocess.run(cmd, check=True, cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upgrade", action="store_true", help="move every pin to the newest release")
    parser.add_argument("-P", "--upgrade-package", action="append", default=[], metavar="NAME[==VERSION]",
                        help="move one package (to VERSION, or its newest), keeping the other pins")
    args = parser.parse_args()
    upgrade = (["--upgrade"] if args.upgrade else []) + [
        arg for spec in args.upgrade_package for arg in ("--upgrade-package", spec)]
    # First pass (no hashes) only to learn which names torch's build drags in.
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.txt"
        if LOCK.exists():
            shutil.copy(LOCK, probe)  # same pin preferences as the real pass
        compile_(probe, *upgrade)
        names = {m.group(1).lower() for line in probe.read_text().splitlines() if (m := PIN.match(line))}
    skipped = sorted(n for n in names if TORCH_BUILD.match(n))
    no_emit = [arg for name in skipped for arg in ("--no-emit-package", name)]
    compile_(LOCK, "--generate-hashes", *no_emit, *upgrade)
    print(f"lock: {LOCK.relative_to(ROOT)} pins {len(names) - len(skipped)} packages; "
          f"left to the host's torch build: {', '.join(skipped)}")


if __name__ == "__main__":
    main()
