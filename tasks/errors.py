"""Errors a user can cause and fix: bad params, bad data, bad paths.

The CLI prints these as one message and exits non-zero, without a traceback. Anything
else is a bug in the pipeline and keeps its traceback.
"""

from __future__ import annotations

import errno
import re


class PipelineError(Exception):
    """A problem the user can fix. `str(err)` is the whole message."""


class ConfigError(PipelineError):
    """params.yaml (or an override) is invalid; lists every problem found, one per line."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


class DataError(PipelineError):
    """The input data cannot be used as asked (missing file, bad record, empty split)."""


class TemplateError(PipelineError):
    """A prompt template is malformed, unsafe, or names a field a record lacks."""


# What the machine, not the pipeline, refused: errno -> (cause, what the user can do).
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: ("no space left on device", "free space there, or write the outputs elsewhere"),
    errno.EDQUOT: ("disk quota exceeded", "free space there, or write the outputs elsewhere"),
    errno.EACCES: ("permission denied", "make it writable (and readable) by this user"),
    errno.EPERM: ("operation not permitted", "make it writable (and readable) by this user"),
    errno.EROFS: ("read-only file system", "remount it read-write, or run from a writable checkout"),
}
# Rust libraries (safetensors, tokenizers) raise their own exception types whose text ends
# in the OS error, e.g. "No space left on device (os error 28)".
RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def environment_errno(err: BaseException) -> int | None:
    """The errno of a full disk, a refused permission or a read-only filesystem behind
    `err`, or None when `err` is something else."""
    code = err.errno if isinstance(err, OSError) else None
    if code is None and (match := RUST_OS_ERROR.search(str(err))):
        code = int(match.group(1))
    return code if code in ENVIRONMENT_ERRNOS else None


def environment_error(err: BaseException, path: object | None) -> PipelineError | None:
    """`err` as one line naming `path` (when known) and the cause, if the environment caused it."""
    code = environment_errno(err)
    if code is None:
        return None
    cause, fix = ENVIRONMENT_ERRNOS[code]
    where = "" if path is None else f"{path}: "
    return PipelineError(f"{where}{cause}; nothing was moved into place ({fix})")
