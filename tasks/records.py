"""Records and examples: reading raw data files in every format prepare takes, rendering a
record through the prompt template into a prompt/completion example, and the hash split.
Shared by prepare, align (preference pairs) and predict (new inputs), so the three read and
render a record the same way."""

from __future__ import annotations

import codecs
import csv
import glob
import gzip
import hashlib
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from tasks import templates
from tasks.config import DataConfig, Params, data_suffix, local_data_problem, path_kind, reference_field
from tasks.errors import DataError, TemplateError
from tasks.io import streaming_lines

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
            for number, raw in enumerate(streaming_lines(f), start=1):
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


# How much of a .json, .csv or .tsv file is read at a time: its records are parsed as the text
# arrives, so memory holds about a chunk and one record, not the file (a .json file may be one
# line).
TEXT_CHUNK_BYTES = 1 << 20
JSON_SPACE = " \t\r\n"


def _text_chunks(path: Path, size: int) -> Iterator[str]:
    """The file as text, `size` bytes at a time: UTF-8, with or without a BOM, else an error
    naming the line and the byte."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    read = newlines = 0
    with _open(path) as f:
        while True:
            chunk = f.read(size)
            pending = decoder.getstate()[0]  # the bytes of a character split by the last read
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                line = newlines + (pending + chunk).count(b"\n", 0, err.start) + 1
                raise DataError(f"{path} line {line}: not UTF-8 text (byte {read - len(pending) + err.start}); "
                                f"{ENCODING_HINT}") from None
            if not chunk:
                return
            read, newlines = read + len(chunk), newlines + chunk.count(b"\n")
            yield text


# The line ends Python's text files split on with newline="" (universal newlines, kept), which
# is how the csv module asks to be given a file.
LINE_END = re.compile(r"\r\n|\r|\n")


def _text_lines(path: Path) -> Iterator[str]:
    """The file's lines as text, line ends kept, one at a time: `_text_chunks` cut as
    open(path, newline="") would cut them, so an encoding error names its line and byte the
    same way as in a .json file."""
    rest = ""  # the start of a line the last read cut
    for text in _text_chunks(path, TEXT_CHUNK_BYTES):
        if text and rest.endswith("\r") and text[0] != "\n":
            yield rest  # a lone "\r" ended it
            rest = ""
        start = 0
        for end in LINE_END.finditer(text):
            if end.group() == "\r" and end.end() == len(text):
                break  # its "\n" may be the next read's first character
            yield rest + text[start:end.end()]
            rest, start = "", end.end()
        rest += text[start:]
    if rest:
        yield rest


def _json(path: Path) -> Iterator[Record]:
    """The records of a JSON list, parsed one at a time as the file is read."""
    decoder = json.JSONDecoder()
    chunks = _text_chunks(path, TEXT_CHUNK_BYTES)
    buf, pos, line_base, eof = "", 0, 1, False

    def fill() -> None:
        """Drops what was parsed and appends the next chunk (eof: there is none)."""
        nonlocal buf, pos, line_base, eof
        line_base += buf.count("\n", 0, pos)
        chunk = next(chunks, None)
        buf, pos, eof = buf[pos:] + (chunk or ""), 0, chunk is None

    def next_char() -> str | None:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in JSON_SPACE:
                pos += 1
            if pos < len(buf):
                return buf[pos]
            if eof:
                return None
            fill()

    def invalid(msg: str, at: int) -> DataError:
        line = line_base + buf.count("\n", 0, at)
        column = at - buf.rfind("\n", 0, at)
        return DataError(f"{path} line {line}: not a valid JSON file: {msg} at column {column}")

    if next_char() != "[":
        raise DataError(f"{path}: expected a JSON list of records (use .jsonl for one per line)")
    pos += 1
    number, closed = 0, next_char() == "]"
    pos += closed
    while not closed:
        if next_char() is None:
            raise invalid("Expecting value", pos)
        while True:
            try:
                record, pos = decoder.raw_decode(buf, pos)
                break
            except json.JSONDecodeError as err:
                if eof:
                    raise invalid(err.msg, err.pos) from None
                fill()  # the record may run past the text read so far
        where = f"{path} record {number}"
        number += 1
        yield (where, record, None) if isinstance(record, dict) else \
            (where, None, "malformed_json: expected a JSON object")
        char = next_char()
        if char not in (",", "]"):
            raise invalid("Expecting ',' delimiter", pos)
        pos, closed = pos + 1, char == "]"
    if next_char() is not None:
        raise invalid("Extra data", pos)


def _csv(path: Path, delimiter: str) -> Iterator[Record]:
    try:
        reader = csv.DictReader(_text_lines(path), delimiter=delimiter)
        for record in reader:
            yield f"{path} line {reader.line_num}", record, None
    except csv.Error as err:
        raise DataError(f"{path}: malformed CSV: {err}") from None


def _parquet(path: Path) -> Iterator[Record]:
    """The file's rows, a record batch at a time: memory holds one batch, not the table."""
    import pyarrow.parquet as pq

    number = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches():
            for record in batch.to_pylist():
                yield f"{path} row {number}", record, None
                number += 1
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: cannot read Parquet: {err}") from None


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


def local_files(patterns: list[str], key: str) -> list[Path]:
    """The files `patterns` (files or globs) name, in sorted order; `key` names the param."""
    files: set[Path] = set()
    for pattern in patterns:
        # Checked again here: params may have been read from another working directory.
        if (problem := local_data_problem(pattern)) is not None:
            raise DataError(f"{key}: {problem}")
        if glob.has_magic(pattern):
            matches = [Path(m) for m in glob.glob(pattern) if not Path(m).is_dir()]
            if not matches:
                raise DataError(f"{key}: no file matches {pattern}")
            files.update(matches)
            continue
        files.add(Path(pattern))
    for path in sorted(files):
        kind = path_kind(path)
        if kind is None:
            raise DataError(f"{key}: {path} does not exist")
        if kind != "a file":
            # Opening a FIFO would block until something writes to it.
            raise DataError(f"{key}: {path} is {kind}, not a data file: put the data in a regular "
                            f"file under data/raw/")
        if path.stat().st_size == 0:
            raise DataError(f"{key}: {path} is empty")
    return sorted(files)


def read_files(files: list[Path], d: DataConfig) -> Iterator[Record]:
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


def to_example(params: Params, tpl: templates.Template | None, tokenizer: Any, where: str,
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


def split_of(key: str, params: Params, derived: set[str] | None = None) -> str:
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
