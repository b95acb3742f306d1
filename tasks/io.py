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
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

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
        _refuse_foreign(final)
        _remove_stale_siblings(final)
        _remove(tmp)
        try:
            yield tmp
            _refuse_foreign(final, tmp)
            _remove(final)
            os.replace(tmp, final)
        finally:
            _remove(tmp)


def _refuse_foreign(final: Path, tmp: Path | None = None) -> None:
    """Refuses to replace at `final` what no stage writes there: a symlink (but DVC's own,
    into its cache) and, once the output (`tmp`) is a file, a folder holding anything. A
    folder replaced by an output folder goes silently: it is that output, from an earlier run."""
    if final.is_symlink():
        target = final.resolve()
        cache = _dvc_cache()
        if cache is None or not target.is_relative_to(cache):
            raise PipelineError(f"{final} is a symlink to {os.readlink(final)}, and the stage would "
                                "replace the link with its output, not write through it: remove the "
                                f"link (to keep outputs on another disk, link {final.parent} instead)")
    elif tmp is not None and not tmp.is_dir() and final.is_dir() and any(final.iterdir()):
        raise PipelineError(f"{final} is a folder holding files the pipeline did not write (it writes "
                            "a file there): move them away")


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


# A file written front to back stays in the page cache while it is under
# PAGE_CACHE_KEEP_BYTES (the next stage, and DVC's hash, read a small output back from
# memory); past that, its pages are dropped every PAGE_CACHE_DROP_BYTES. On the 2-core VM
# the benchmarks run on, once a file being written had about 2 GB in the cache, each
# further GB cost 4-8 CPU seconds in the kernel instead of 0.4; dropping every 64 MiB kept
# it under one (BENCHMARKS.md, 2026-12-05).
# Reading a file larger than PAGE_CACHE_KEEP_BYTES once, front to back, likewise: 7.6 GB of
# lines cost 9-16 kernel seconds read plainly, 1.0 with the pages read dropped as it went.
PAGE_CACHE_KEEP_BYTES = 1 << 30
PAGE_CACHE_DROP_BYTES = 64 << 20


class StreamingWriter:
    """A binary file written front to back, too large to be worth caching: past
    PAGE_CACHE_KEEP_BYTES the kernel is told, every PAGE_CACHE_DROP_BYTES, to write back its
    dirty pages and drop its clean ones (what it wrote back since the last time)."""

    def __init__(self, path: Path):
        self._file = path.open("wb")
        self._written = self._dropped = 0

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._written += len(data)
        if self._written >= PAGE_CACHE_KEEP_BYTES and self._written - self._dropped >= PAGE_CACHE_DROP_BYTES:
            self._file.flush()
            if hasattr(os, "posix_fadvise"):  # not on macOS, whose cache does not need it
                os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            self._dropped = self._written

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def streaming_lines(f: BinaryIO) -> Iterator[bytes]:
    """The lines of `f`, a file opened "rb" (or a reader decompressing one) read front to
    back once. When the file on disk is larger than PAGE_CACHE_KEEP_BYTES, the kernel is told,
    every PAGE_CACHE_DROP_BYTES of lines, to drop the pages read so far."""
    try:
        fd = f.fileno()
        large = hasattr(os, "posix_fadvise") and os.fstat(fd).st_size > PAGE_CACHE_KEEP_BYTES
    except (AttributeError, OSError, ValueError):  # a reader with no file behind it (zstandard's)
        large = False
    if not large:
        yield from f
        return
    since = 0
    for line in f:
        yield line
        since += len(line)
        if since >= PAGE_CACHE_DROP_BYTES:
            # Up to the file's offset: what the reader (and a decompressor) has taken in.
            os.posix_fadvise(fd, 0, os.lseek(fd, 0, os.SEEK_CUR), os.POSIX_FADV_DONTNEED)
            since = 0


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# Reading back what a stage wrote: a file cut short by a full disk or a kill, overwritten
# by hand or by another tool, or from an older version of the pipeline would otherwise stop
# a later stage with a traceback from json, a KeyError, or a library's own error.

# How to get back a JSONL file whose reader did not say: DVC reruns a stage whose output changed.
RERUN = "rerun `dvc repro` to write it again"
# A JSON value's kind as a message names it, by the Python type json gives it.
JSON_KINDS: dict[type, str] = {dict: "an object", list: "a list", str: "a string", int: "an integer",
                               float: "a number", bool: "true or false", type(None): "null"}
Required = Mapping[str, type | tuple[type, ...]]  # key -> the types its value may have (object: any)


def damaged(where: object, problem: str, recover: str) -> PipelineError:
    """The one message for a file the pipeline wrote that cannot be read back: which file
    (and line), what is wrong with it, and how to get a good one."""
    return PipelineError(f"{where}: {problem}; {recover}")


def _kind(value: Any) -> str:
    return JSON_KINDS.get(type(value), type(value).__name__)


def _kinds(expected: type | tuple[type, ...]) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(JSON_KINDS.get(t, t.__name__) for t in types)


def check_shape(where: object, value: Any, recover: str, shape: type = dict,
                required: Required | None = None) -> Any:
    """`value` if it is a `shape` holding each `required` key with a value of its types."""
    if not isinstance(value, shape):
        raise damaged(where, f"holds {_kind(value)} where {_kinds(shape)} was expected", recover)
    for key, expected in (required or {}).items():
        if key not in value:
            raise damaged(where, f"has no {key!r}", recover)
        if not isinstance(value[key], expected):
            raise damaged(where, f"{key!r} is {_kind(value[key])}, not {_kinds(expected)}", recover)
    return value


def _parse(where: object, data: bytes, recover: str) -> Any:
    if not data.strip():
        raise damaged(where, "empty", recover)
    try:
        text = data.decode("utf-8-sig")  # a byte order mark, as Windows tools write, is no damage
    except UnicodeDecodeError as err:
        raise damaged(where, f"not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})",
                      recover) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        # A string runs to the end of the text only when its closing quote was cut off.
        cut = err.pos >= len(text.rstrip()) or err.msg.startswith("Unterminated string")
        raise damaged(where, f"not valid JSON{' (cut short)' if cut else ''} ({err.msg}: line {err.lineno} "
                      f"column {err.colno})", recover) from None


def _open(path: Path, recover: str) -> BinaryIO:
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise damaged(path, "missing", recover) from None
    except IsADirectoryError:
        raise damaged(path, "a folder, not a file", recover) from None


def read_json_state(path: Path, *, recover: str, shape: type = dict,
                    required: Required | None = None) -> Any:
    """A JSON file a stage wrote, as `shape` with the `required` keys; a missing, empty,
    cut-short, non-UTF-8 or otherwise shaped file ends in one PipelineError naming it and
    saying how to recover (`recover`: e.g. "rerun `dvc repro export`")."""
    with _open(path, recover) as f:
        data = f.read()
    return check_shape(path, _parse(path, data, recover), recover, shape, required)


def read_json_folder(folder: Path, *, recover: str,
                     required: Mapping[str, Required] | None = None) -> dict[str, Any]:
    """Every *.json file under `folder` (a saved adapter, tokenizer or dataset), read as
    read_json_state reads one, by path relative to `folder`; the `required` files (relative
    path -> their required keys) must be there. Checked before a library loads the folder:
    transformers, PEFT and datasets stop on a damaged file with a traceback."""
    found = {path.relative_to(folder).as_posix(): read_json_state(path, recover=recover)
             for path in sorted(folder.rglob("*.json")) if path.is_file()}
    for name, keys in (required or {}).items():
        if name not in found:
            raise damaged(folder / name, "missing", recover)
        check_shape(folder / name, found[name], recover, dict, keys)
    return found


def iter_jsonl(path: Path, *, recover: str = RERUN,
               required: Required | None = None) -> Iterator[dict[str, Any]]:
    """The rows of a JSONL file a stage wrote, one at a time (a file larger than memory
    streams); a missing file, or a line that is not a JSON object with the `required` keys,
    ends in one PipelineError naming the file and line."""
    with _open(path, recover) as f:
        for number, line in enumerate(streaming_lines(f), 1):
            if line.strip():
                where = f"{path} line {number}"
                yield check_shape(where, _parse(where, line, recover), recover, dict, required)


def read_jsonl(path: Path, *, recover: str = RERUN,
               required: Required | None = None) -> list[dict[str, Any]]:
    return list(iter_jsonl(path, recover=recover, required=required))


def console_script(name: str) -> str | None:
    """The command `name` of this environment: beside this interpreter (a venv that was not
    activated puts it there, not on PATH), else on PATH; None when neither has it."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


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


def check_adapter(folder: Path, recover: str) -> Path:
    """`folder`, once its adapter_config.json and tokenizer files read back (read_json_folder)."""
    read_json_folder(folder, recover=recover, required={"adapter_config.json": {"peft_type": str}})
    return folder


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
