"""Files between stages: atomic outputs, JSON/JSONL, hashes, logging set-up."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("finetune")


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; move it into place only if the block succeeds.

    An interrupted or failed stage so never leaves a partial output that DVC could cache or
    a later stage could read. Works for files and directories.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        _remove(final)
        os.replace(tmp, final)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


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


def setup_logging() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter("%(asctime)s %(name)s %(levelname)s %(message)s",
                                            datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
