"""Check that the virtual environment holds exactly what the lock pins.

Run by `make setup` after installing, and by tests/test_environment.py. Exit 1 with one line
per difference: a locked package missing or at another version, or a package the lock does
not know (torch's own build packages excepted: see scripts/lock.py).
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "lock.txt"
TORCH = ROOT / "requirements" / "torch.txt"
PROJECT = "finetune-pipeline"
# Build packages that a CUDA torch brings along (exact versions pinned by torch itself), and
# the installers venv ships on its own.
HOST_BUILD = re.compile(r"^(triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)$")
VENV_OWN = {"pip", "setuptools", "wheel"}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^ ;\\]+)\s*(?:;\s*(.+?))?\s*\\?$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def marker_holds(marker: str | None) -> bool:
    if not marker:
        return True
    from packaging.markers import Marker

    return Marker(marker).evaluate()


def pins(path: Path) -> dict[str, str]:
    """{name: version} for the pins of `path` whose environment markers hold here."""
    out = {}
    for line in path.read_text().splitlines():
        m = PIN.match(line)
        if m and marker_holds(m.group(3)):
            out[canonical(m.group(1))] = m.group(2)
    return out


def installed() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}


def differences() -> list[str]:
    want = pins(LOCK) | pins(TORCH)
    have = installed()
    problems = []
    for name, version in sorted(want.items()):
        got = have.get(name)
        # torch's local label (+cpu, +cu130) names the build, not the version.
        if got is None or got.split("+")[0] != version:
            problems.append(f"{name}: locked {version}, installed {got or 'nothing'}")
    for name in sorted(set(have) - set(want)):
        if name != PROJECT and name not in VENV_OWN and not HOST_BUILD.match(name):
            problems.append(f"{name}: installed {have[name]}, not in {LOCK.relative_to(ROOT)}")
    return problems


def main() -> None:
    problems = differences()
    if problems:
        print(f"the environment differs from {LOCK.relative_to(ROOT)} (run `make setup`):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        sys.exit(1)
    print(f"environment matches {LOCK.relative_to(ROOT)} ({len(pins(LOCK))} pins) and {TORCH.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
