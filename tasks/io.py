"""Files between stages: atomic outputs, JSON/JSONL, hashes, logging set-up."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tasks.errors import PipelineError, environment_error

log = logging.getLogger("finetune")


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; move it into place only if the block succeeds.

    An interrupted or failed stage so never leaves a partial output that DVC could cache or
    a later stage could read. Works for files and directories. A full disk, a refused
    permission or a read-only filesystem ends in a PipelineError naming `final`.
    """
    final = Path(final)
    tmp = final.with_name(f"{TMP_PREFIX.format(name=final.name)}{os.getpid()}")
    with writing(final, tmp):
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_siblings(final)
        _remove(tmp)
        try:
            yield tmp
            _remove(final)
            os.replace(tmp, final)
        finally:
            _remove(tmp)


# A temporary output's name: hidden, next to the output, ending in the writer's pid.
TMP_PREFIX = ".{name}.tmp-"


@contextlib.contextmanager
def writing(target: Path, tmp: Path | None = None) -> Iterator[None]:
    """Turns a full disk, a refused permission or a read-only filesystem met in the block
    into one PipelineError naming the file (inside `tmp`, the output it was to become) or,
    when the library did not say which file, `target`."""
    try:
        yield
    except PipelineError:
        raise
    except Exception as err:
        culprit: Path = target
        filename = getattr(err, "filename", None)
        if filename is not None:
            culprit = Path(filename)
            if tmp is not None and culprit.is_relative_to(tmp):
                culprit = target / culprit.relative_to(tmp) if culprit != tmp else target
        translated = environment_error(err, culprit)
        if translated is None and any(m in str(err) for m in TORCH_WRITE_FAILURES) and _full(target):
            translated = environment_error(OSError(errno.ENOSPC, "disk full"), target)
        if translated is None:
            raise
        raise translated from None


# torch.save reports a failed write without errno ("unexpected pos N vs M", or
# "PytorchStreamWriter failed writing file ..."): with less free space than FULL_DISK_BYTES
# left, the disk filled up.
TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed")
FULL_DISK_BYTES = 64 << 10


def existing_ancestor(path: Path) -> Path:
    """`path`, or its nearest parent that exists: where the output's filesystem is."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def _full(target: Path) -> bool:
    try:
        return shutil.disk_usage(existing_ancestor(target)).free < FULL_DISK_BYTES
    except OSError:
        return False


def _remove_stale_siblings(final: Path) -> None:
    """Removes temporary outputs of writers that were killed (SIGKILL leaves them behind):
    a killed export of an 8B model would otherwise keep 16 GB of disk per attempt."""
    prefix = TMP_PREFIX.format(name=final.name)
    for sibling in final.parent.glob(f"{glob.escape(prefix)}*"):
        pid = sibling.name.removeprefix(prefix)
        if pid.isdigit() and not _alive(int(pid)):
            log.info("removing %s, left by a killed run", sibling)
            _remove(sibling)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def external_links(folders: Iterable[Path]) -> list[tuple[Path, Path]]:
    """(link, target) for each symlink in `folders` (or being one) that resolves outside the
    working directory, the repository the stages run in, and outside DVC's cache."""
    repo = Path.cwd().resolve()
    found = []
    for folder in folders:
        candidates = [folder] if folder.is_symlink() else []
        for parent, dirs, files in os.walk(folder):  # does not descend into linked folders
            candidates += [Path(parent) / name for name in sorted(dirs + files)]
        for path in candidates:
            if path.is_symlink() and not (target := path.resolve()).is_relative_to(repo):
                found.append((path, target))
    if found and (cache := _dvc_cache()) is not None:
        found = [(link, target) for link, target in found if not target.is_relative_to(cache)]
    return found


def _dvc_cache() -> Path | None:
    """Where DVC keeps tracked files' contents: with `cache.type: symlink` and a shared cache
    folder (`dvc cache dir`), DVC's own links point there. None outside a DVC repository."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        with Repo(".") as repo:
            return Path(repo.cache.local.path).resolve()
    except NotDvcRepoError:
        return None


def check_external_links(folders: Iterable[Path], allow: bool) -> None:
    """Refuses inputs that are links to files outside the repository, which DVC would
    version without the repository holding them, unless data.allow_external_links."""
    links = external_links(folders)
    if links and not allow:
        link, target = links[0]
        more = f" (and {len(links) - 1} more)" if len(links) > 1 else ""
        raise PipelineError(f"{link} is a symlink to {target}, outside the repository{more}: copy "
                            "it into the repository, or set data.allow_external_links: true")
    for link, target in links:
        log.warning("data.allow_external_links is on: reading %s -> %s, outside the repository",
                    link, target)


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of a JSONL file, one at a time: a file larger than memory streams."""
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return list(iter_jsonl(path))


def sha256_path(path: Path) -> str:
    """Hash of a file, or of a directory's relative file names and contents."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def save_tokenizer(tokenizer: Any, path: Path) -> None:
    """save_pretrained, minus the caller's HF_HUB_OFFLINE setting, which would otherwise make
    the same tokenizer save to different bytes online and offline."""
    tokenizer.init_kwargs.pop("local_files_only", None)
    tokenizer.save_pretrained(path)


def normalize_adapter_config(path: Path) -> None:
    """PEFT writes module lists from sets, in an order that changes between runs; sort them
    so the same training gives a byte-identical adapter."""
    config_file = path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    for key in ("target_modules", "feedforward_modules"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# Where a Hugging Face token may be set; the pipeline reads tokens only from the environment.
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
REDACTED = "***"


def redact(text: str) -> str:
    """`text` with any token from the environment replaced by ***."""
    for name in TOKEN_VARIABLES:
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, REDACTED)
    return text


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is when a record is logged, not as it was when logging was
    set up: a caller that swaps stderr (pytest's capture, a notebook) and closes the old one
    would otherwise leave every later log record failing on a closed file."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging() -> None:
    handler = StderrHandler()
    handler.setFormatter(RedactingFormatter("%(asctime)s %(name)s %(levelname)s %(message)s",
                                            datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
