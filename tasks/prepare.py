"""prepare: render raw records through the prompt template into prompt/completion pairs,
and split them deterministically into train/validation/test.

Reads `data.*` and `prompt.*`; writes data/prepared/{train,validation,test}.jsonl (rows:
{id, prompt, completion}; for sequence_classification the completion is the class name) and
metrics/prepare.json (rows in, out, dropped and why).

    finetune prepare
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks import leakage, paths, templates
from tasks.config import Params
from tasks.errors import DataError, TemplateError
from tasks.io import atomic_path, write_json, write_jsonl

log = logging.getLogger("finetune.prepare")

Record = tuple[str, dict[str, Any] | None, str | None]  # (where, record, why it is bad)


class BadRecord(Exception):
    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


# Windows tools and spreadsheet exports start UTF-8 files with a byte order mark.
UTF8_BOM = codecs.BOM_UTF8
ENCODING_HINT = "re-save the file as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8, or Excel's 'CSV UTF-8')"


def _jsonl(path: Path) -> Iterator[Record]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path} line {number}"
            if number == 1:
                raw = raw.removeprefix(UTF8_BOM)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield where, None, f"not_utf8: byte {err.start} is not valid UTF-8; {ENCODING_HINT}"
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield where, None, f"malformed_json: {err.msg} at column {err.colno}"
                continue
            if not isinstance(record, dict):
                yield where, None, f"malformed_json: expected a JSON object, got {type(record).__name__}"
                continue
            yield where, record, None


def _text(path: Path) -> str:
    """The whole file as text: UTF-8, with or without a BOM, else an error naming the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not UTF-8 text (byte {err.start}); {ENCODING_HINT}") from None


def _json(path: Path) -> Iterator[Record]:
    try:
        rows = json.loads(_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} line {err.lineno}: not a valid JSON file: {err.msg} at column "
                        f"{err.colno}") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of records (use .jsonl for one per line)")
    for number, record in enumerate(rows):
        where = f"{path} record {number}"
        yield (where, record, None) if isinstance(record, dict) else \
            (where, None, "malformed_json: expected a JSON object")


def _csv(path: Path) -> Iterator[Record]:
    try:
        reader = csv.DictReader(io.StringIO(_text(path), newline=""))
        for record in reader:
            yield f"{path} line {reader.line_num}", record, None
    except csv.Error as err:
        raise DataError(f"{path}: malformed CSV: {err}") from None


def _parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: cannot read Parquet: {err}") from None
    for number, record in enumerate(table.to_pylist()):
        yield f"{path} row {number}", record, None


READERS = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}


def _hub(params: Params, split: str) -> Iterator[Record]:
    import datasets

    d = params.data
    try:
        ds = datasets.load_dataset(d.path, d.name, revision=d.revision, split=split)
    except Exception as err:  # network, missing revision, missing split: all user-fixable
        raise DataError(f"data.path: cannot load Hub dataset {d.path!r} (revision {d.revision}, "
                        f"split {split!r}): {err}") from None
    for number, record in enumerate(ds):
        yield f"{d.path}[{split}] row {number}", record, None


def _local(params: Params) -> Iterator[Record]:
    path = Path(params.data.path)
    if not path.is_file():
        raise DataError(f"data.path: {path} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"data.path: {path} is empty")
    return READERS[path.suffix.lower()](path)


def _to_example(params: Params, tpl: templates.Template | None, tokenizer: Any, where: str,
                record: dict[str, Any]) -> dict[str, str]:
    d = params.data
    values = {}
    for name in params.prompt.fields:
        column = d.columns.get(name, name)
        if record.get(column) is None:
            raise BadRecord("missing_field", f"{where}: missing field {column!r}"
                            + (f" (template field {name!r})" if column != name else ""))
        values[name] = record[column]
    try:
        if tpl is None:
            prompt, completion = templates.render_chat(values["messages"], tokenizer, where)
        else:
            prompt, completion = templates.render(tpl, values, where)
    except TemplateError as err:
        raise BadRecord("wrong_type", str(err)) from None
    if not completion.strip():
        raise BadRecord("empty_completion", f"{where}: the completion is empty")
    if params.model.labels is not None:
        completion = _label_name(params.model.labels, completion.strip(), where)
    return {"prompt": prompt, "completion": completion}


def _label_name(labels: list[str], value: str, where: str) -> str:
    """The class name a record's label stands for: the name itself, or its index."""
    if value in labels:
        return value
    if value.isdigit() and int(value) < len(labels):
        return labels[int(value)]
    raise BadRecord("unknown_label", f"{where}: label {value!r} is neither one of model.labels "
                    f"({', '.join(labels)}) nor an index into them")


def _split_of(key: str, params: Params) -> str:
    s = params.data.split
    # A hash of (seed, id) rather than a shuffle: a row keeps its split when data is added
    # or reordered, so test rows never leak into training as the dataset grows.
    u = int(hashlib.sha256(f"{s.seed}:{key}".encode()).hexdigest()[:8], 16) / 2**32
    if u < s.test_size:
        return "test"
    return "validation" if u < s.test_size + s.validation_size else "train"


def _sources(params: Params) -> list[tuple[str | None, Iterator[Record]]]:
    """(fixed split or None, records) for each source the data comes from."""
    d = params.data
    if d.is_local:
        return [(None, _local(params))]
    if d.split.source_splits:
        return [(ours, _hub(params, theirs)) for ours, theirs in d.split.source_splits.items()]
    return [(None, _hub(params, "train"))]


def run(params: Params) -> dict[str, Any]:
    d = params.data
    tpl = None if params.prompt.template == templates.CHAT else \
        templates.resolve(params.prompt.template, params.prompt.completion)
    tokenizer = None
    if tpl is None:
        from tasks.modeling import load_tokenizer

        tokenizer = load_tokenizer(params.model)
    splits: dict[str, list[dict[str, str]]] = {s: [] for s in paths.SPLITS}
    dropped: Counter[str] = Counter()
    seen_ids: set[str] = set()
    rows_in = 0
    for fixed_split, records in _sources(params):
        for number, (where, record, bad) in enumerate(records):
            if d.max_rows is not None and number >= d.max_rows:
                break
            rows_in += 1
            try:
                if bad is not None:
                    reason, _, message = bad.partition(": ")
                    raise BadRecord(reason, f"{where}: {message}")
                assert record is not None
                example = _to_example(params, tpl, tokenizer, where, record)
                if d.id_column is None:
                    row_id = f"row{rows_in - 1}"
                    key = json.dumps(example, sort_keys=True)
                else:
                    if record.get(d.id_column) is None:
                        raise BadRecord("missing_id", f"{where}: missing id column {d.id_column!r} "
                                        "(set data.id_column: null if your data has none)")
                    row_id = key = str(record[d.id_column])
                    if row_id in seen_ids:
                        raise BadRecord("duplicate_id", f"{where}: duplicate id {row_id!r}")
                seen_ids.add(row_id)
            except BadRecord as err:
                if d.on_bad_record == "error":
                    raise DataError(f"{err} (set data.on_bad_record: skip to drop such records)") from None
                dropped[err.reason] += 1
                log.warning("skipped %s", err)
                continue
            split = fixed_split or _split_of(key, params)
            splits[split].append({"id": row_id, **example})
    if rows_in == 0:
        raise DataError(f"data.path: {d.path} has no records")
    leaked = leakage.check(splits, d)
    if leaked["dropped"]:
        dropped["leakage"] += leaked["dropped"]
    for split, rows in splits.items():
        if not rows and (split != "validation" or d.split.validation_size > 0):
            raise DataError(f"the {split} split is empty ({rows_in} rows read, "
                            f"{sum(dropped.values())} dropped): add data or change data.split")
    with atomic_path(paths.PREPARED) as tmp:
        tmp.mkdir()
        for split, rows in splits.items():
            write_jsonl(tmp / f"{split}.jsonl", rows)
    stats = {"rows_in": rows_in, "rows_out": sum(len(r) for r in splits.values()),
             "rows_dropped": sum(dropped.values()), "dropped_by_reason": dict(sorted(dropped.items())),
             "rows_per_split": {s: len(r) for s, r in splits.items()}, "leakage": leaked}
    write_json(paths.METRICS["prepare"], stats)
    log.info("prepared %s", stats)
    return stats
