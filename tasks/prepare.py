"""prepare: render raw records through the prompt template into prompt/completion pairs,
and split them deterministically into train/validation/test.

Reads `data.*` and `prompt.*` (one local file, a glob or list of files, {train, validation,
test} split files, or a Hub dataset; or a mixture of such sources, data.sources); writes data/prepared/{train,validation,test}.jsonl
(rows: {id, prompt, completion}; for sequence_classification the completion is the class
name; test rows with several references add `references`, a list of texts; train and
validation rows of prompt.template chat add `messages`, the whole conversation) and
metrics/prepare.json (rows in, out, dropped and why).

    finetune prepare
"""

from __future__ import annotations

import codecs
import csv
import glob
import gzip
import hashlib
import io
import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from tasks import leakage, paths, templates
from tasks.config import DataConfig, Params, PromptConfig, data_suffix, reference_field
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


def _open(path: Path) -> IO[bytes]:
    """The file's bytes, decompressed as they are read for .gz and .zst."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".zst":
        import zstandard

        # zstandard's reader has no readline; the buffer gives line iteration.
        return io.BufferedReader(zstandard.open(path, "rb"))
    return path.open("rb")


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line); a corrupt compressed file ends in an error naming the line."""
    with _open(path) as f:
        number = 0
        try:
            for number, raw in enumerate(f, start=1):
                yield number, raw
        except Exception as err:  # gzip raises OSError/EOFError, zstandard its ZstdError
            raise DataError(f"{path} line {number + 1}: cannot decompress: {err}") from None


def _jsonl(path: Path) -> Iterator[Record]:
    for number, raw in _lines(path):
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


def _csv(path: Path, delimiter: str) -> Iterator[Record]:
    try:
        reader = csv.DictReader(io.StringIO(_text(path), newline=""), delimiter=delimiter)
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


# data.delimiter's default per format.
DELIMITERS = {".csv": ",", ".tsv": "\t"}


def read_file(path: Path, d: DataConfig) -> Iterator[Record]:
    """The records of one local file, in any format prepare reads."""
    suffix = data_suffix(str(path))
    if suffix in DELIMITERS:
        return _csv(path, d.delimiter or DELIMITERS[suffix])
    if suffix == ".json":
        return _json(path)
    if suffix == ".parquet":
        return _parquet(path)
    return _jsonl(path)


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


def local_files(patterns: list[str], key: str) -> list[Path]:
    """The files `patterns` (files or globs) name, in sorted order; `key` names the param."""
    files: set[Path] = set()
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = [Path(m) for m in glob.glob(pattern) if Path(m).is_file()]
            if not matches:
                raise DataError(f"{key}: no file matches {pattern}")
            files.update(matches)
            continue
        path = Path(pattern)
        if not path.is_file():
            raise DataError(f"{key}: {path} does not exist")
        files.add(path)
    for path in files:
        if path.stat().st_size == 0:
            raise DataError(f"{key}: {path} is empty")
    return sorted(files)


def _local(files: list[Path], d: DataConfig) -> Iterator[Record]:
    for path in files:
        yield from read_file(path, d)


def reference_texts(value: Any) -> list[str] | None:
    """A reference cell as texts: one text, or a list of them; None when it is not text."""
    texts = value if isinstance(value, list) else [value]
    return texts if texts and all(isinstance(t, str) and t.strip() for t in texts) else None


def _references(d: DataConfig, ref_field: str | None, record: dict[str, Any], where: str) -> list[str] | None:
    """The reference texts of a record: data.references' columns, or the items of a
    list-valued completion field; None when the record has a single reference."""
    if d.references:
        refs = []
        for column in d.references:
            if record.get(column) is None:
                continue  # training rows often carry one reference under another column
            texts = reference_texts(record[column])
            if texts is None:
                raise BadRecord("wrong_type", f"{where}: reference column {column!r} is neither "
                                "text nor a list of texts")
            refs += texts
        return refs or None
    value = record.get(d.columns.get(ref_field, ref_field)) if ref_field else None
    if not isinstance(value, list):
        return None
    if reference_texts(value) is None:
        raise BadRecord("wrong_type", f"{where}: field {ref_field!r} is a list, but not of texts")
    return value


def prompt_values(params: Params, record: dict[str, Any], where: str, names: list[str],
                  refs: list[str] | None = None, ref_field: str | None = None) -> dict[str, Any]:
    """The template fields `names` of a record, through data.columns."""
    d = params.data
    values = {}
    for name in names:
        column = d.columns.get(name, name)
        if name == ref_field and refs:
            # The first reference is what a training row learns.
            values[name] = record[column] if isinstance(record.get(column), str) else refs[0]
            continue
        if record.get(column) is None:
            raise BadRecord("missing_field", f"{where}: missing field {column!r}"
                            + (f" (template field {name!r})" if column != name else ""))
        values[name] = record[column]
    return values


def _to_example(params: Params, tpl: templates.Template | None, tokenizer: Any, where: str,
                record: dict[str, Any]) -> dict[str, Any]:
    # A class label has no references to pick the best of.
    ref_field = reference_field(params.prompt) if params.model.labels is None else None
    refs = _references(params.data, ref_field, record, where)
    values = prompt_values(params, record, where, params.prompt.fields, refs, ref_field)
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
        completion = label_name(params.model.labels, completion.strip(), where)
    example: dict[str, Any] = {"prompt": prompt, "completion": completion}
    if tpl is None:
        # tokenize trains every assistant turn of the conversation, not only the last.
        example["messages"] = values["messages"]
    if refs and tpl is not None and ref_field is not None:
        # Each reference is rendered as the completion would be, so evaluate compares like
        # with like (the completion template may add text around the field).
        example["references"] = [templates.fill(tpl.completion, {**values, ref_field: r}, where).strip()
                                 for r in refs]
    return example


def label_name(labels: list[str], value: str, where: str) -> str:
    """The class name a record's label stands for: the name itself, or its index."""
    if value in labels:
        return value
    if value.isdigit() and int(value) < len(labels):
        return labels[int(value)]
    raise BadRecord("unknown_label", f"{where}: label {value!r} is neither one of model.labels "
                    f"({', '.join(labels)}) nor an index into them")


def _split_of(key: str, params: Params, derived: set[str] | None = None) -> str:
    """The split a row's id hashes to; `derived` (default: data.hash_splits) are the splits
    the hash may fill, the others' shares staying in train."""
    s = params.data.split
    # A hash of (seed, id) rather than a shuffle: a row keeps its split when data is added
    # or reordered, so test rows never leak into training as the dataset grows. A split
    # given as files takes no train rows: its share of them stays in train.
    u = int(hashlib.sha256(f"{s.seed}:{key}".encode()).hexdigest()[:8], 16) / 2**32
    derived = params.data.hash_splits if derived is None else derived
    if u < s.test_size:
        return "test" if "test" in derived else "train"
    if u < s.test_size + s.validation_size and "validation" in derived:
        return "validation"
    return "train"


def _sources(params: Params) -> list[tuple[str | None, Iterator[Record]]]:
    """(fixed split or None, records) for each source the data comes from."""
    d = params.data
    if d.is_local:
        # Every file is checked before any is read: a typo in test's glob fails at once.
        sources = [(split, local_files(patterns, "data.path" if split is None else f"data.path.{split}"))
                   for split, patterns in d.local_sources()]
        # Train's rows go through the hash split, which fills only the splits no file gives.
        return [(None if split == "train" else split, _local(files, d)) for split, files in sources]
    if d.split.source_splits:
        return [(ours, _hub(params, theirs)) for ours, theirs in d.split.source_splits.items()]
    return [(None, _hub(params, "train"))]


def _parts(params: Params) -> list[tuple[str | None, Params]]:
    """(label, params as the source sees them) per source; one unlabelled part without a mixture."""
    d = params.data
    if d.sources is None:
        return [(None, params)]
    parts = []
    for i, src in enumerate(d.sources):
        prompt = params.prompt if src.template is None else \
            PromptConfig(template=src.template, completion=src.completion)
        parts.append((src.label or f"source{i}",
                      params.model_copy(update={"data": d.source(i), "prompt": prompt})))
    return parts


def _mix(params: Params, splits: dict[str, list[dict[str, Any]]], labels: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The splits after each source's weight or row cap, which apply to the whole source (its
    splits keep their proportions through the hash split). Rows are chosen by a hash of
    (seed, id), so the same data and seed keep the same rows; kept rows keep their order."""
    d = params.data
    by_source: dict[str, list[str]] = {label: [] for label in labels}
    for rows in splits.values():
        for row in rows:
            by_source[row["id"].split(MIX_SEPARATOR, 1)[0]].append(row["id"])
    for ids in by_source.values():
        ids.sort(key=lambda i: hashlib.sha256(f"{d.split.seed}:mix:{i}".encode()).digest())
    sources = dict(zip(labels, d.sources or [], strict=True))
    weighted = {label: src.weight for label, src in sources.items() if src.weight is not None}
    total = sum(weighted.values())
    # The largest mixture with these shares that takes no row twice.
    size = min((len(by_source[label]) / (w / total) for label, w in weighted.items()), default=0.0)
    keep: set[str] = set()
    for label, src in sources.items():
        n = len(by_source[label])
        if src.weight is not None:
            n = min(n, int(size * src.weight / total + MIX_ROUNDING))
        elif src.row_cap is not None:
            n = min(n, src.row_cap)
        keep.update(by_source[label][:n])
    return {split: [row for row in rows if row["id"] in keep] for split, rows in splits.items()}


# A mixture's row ids are "<source label>/<id>": sources may reuse each other's ids.
MIX_SEPARATOR = "/"
# Shares are floored; this absorbs float error (0.3 * 10 / 0.3 is 9.999...).
MIX_ROUNDING = 1e-9


def run(params: Params) -> dict[str, Any]:
    splits: dict[str, list[dict[str, str]]] = {s: [] for s in paths.SPLITS}
    dropped: Counter[str] = Counter()
    seen_ids: set[str] = set()
    rows_in = 0
    tokenizer = None
    parts = _parts(params)
    for label, part in parts:
        d = part.data
        tpl = None if part.prompt.template == templates.CHAT else \
            templates.resolve(part.prompt.template, part.prompt.completion)
        if tpl is None and tokenizer is None:
            from tasks.modeling import load_tokenizer

            tokenizer = load_tokenizer(params.model)
        prefix = "" if label is None else f"{label}{MIX_SEPARATOR}"
        for fixed_split, records in _sources(part):
            for number, (where, record, bad) in enumerate(records):
                if d.max_rows is not None and number >= d.max_rows:
                    break
                rows_in += 1
                try:
                    if bad is not None:
                        reason, _, message = bad.partition(": ")
                        raise BadRecord(reason, f"{where}: {message}")
                    assert record is not None
                    example = _to_example(part, tpl, tokenizer, where, record)
                    if d.id_column is None:
                        row_id = f"{prefix}row{rows_in - 1}"
                        # The rendered pair alone, as before chats kept their messages:
                        # a row keeps the split it had.
                        key = json.dumps({k: v for k, v in example.items() if k != "messages"},
                                         sort_keys=True)
                    else:
                        if record.get(d.id_column) is None:
                            raise BadRecord("missing_id", f"{where}: missing id column {d.id_column!r} "
                                            "(set data.id_column: null if your data has none)")
                        row_id = key = prefix + str(record[d.id_column])
                        if row_id in seen_ids:
                            raise BadRecord("duplicate_id", f"{where}: duplicate id {row_id!r}")
                    seen_ids.add(row_id)
                except BadRecord as err:
                    if d.on_bad_record == "error":
                        raise DataError(f"{err} (set data.on_bad_record: skip to drop such records)") from None
                    dropped[err.reason] += 1
                    log.warning("skipped %s", err)
                    continue
                split = fixed_split or _split_of(key, part)
                if split != "test":
                    example.pop("references", None)  # only evaluate reads them
                else:
                    example.pop("messages", None)  # evaluate generates the last turn from the prompt
                splits[split].append({"id": row_id, **example})
    d = params.data
    if rows_in == 0:
        raise DataError(f"data.path: {d.path} has no records" if d.sources is None else
                        "data.sources: no source has records")
    labels = [label for label, _ in parts if label is not None]
    if labels:
        splits = _mix(params, splits, labels)
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
    stats: dict[str, Any] = {
        "rows_in": rows_in, "rows_out": sum(len(r) for r in splits.values()),
        "rows_dropped": sum(dropped.values()), "dropped_by_reason": dict(sorted(dropped.items())),
        "rows_per_split": {s: len(r) for s, r in splits.items()}, "leakage": leaked}
    if labels:
        stats["rows_per_source"] = {label: {s: sum(r["id"].startswith(label + MIX_SEPARATOR) for r in rows)
                                            for s, rows in splits.items()} for label in labels}
    write_json(paths.METRICS["prepare"], stats)
    log.info("prepared %s", stats)
    return stats
