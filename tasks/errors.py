"""Errors a user can cause and fix: bad params, bad data, bad paths.

The CLI prints these as one message and exits non-zero, without a traceback. Anything
else is a bug in the pipeline and keeps its traceback.
"""

from __future__ import annotations


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
