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

import contextlib
import hashlib
import json
import logging
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks import leakage, templates
from tasks.config import Params, PromptConfig
from tasks.errors import DataError
from tasks.io import StreamingWriter, atomic_path, streaming_lines, write_json
from tasks.records import BadRecord, Record, local_files, read_files, split_of, to_example
from tasks.workspace import SPLITS, Workspace

log = logging.getLogger("finetune.prepare")

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


def _sources(params: Params) -> list[tuple[str | None, Iterator[Record]]]:
    """(fixed split or None, records) for each source the data comes from."""
    d = params.data
    if d.is_local:
        # Every file is checked before any is read: a typo in test's glob fails at once.
        sources = [(split, local_files(patterns, "data.path" if split is None else f"data.path.{split}"))
                   for split, patterns in d.local_sources()]
        # Train's rows go through the hash split, which fills only the splits no file gives.
        return [(None if split == "train" else split, read_files(files, d)) for split, files in sources]
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


class _Mixture:
    """The rows read so far, by split, source and mixture hash (35 bytes a row, the rows
    themselves being on disk already), so that each source's weight or row cap can choose
    its rows once every row is read. The cap applies to the whole source (its splits keep
    their proportions through the hash split). Rows are chosen by a hash of (seed, id), so
    the same data and seed keep the same rows; kept rows keep their order."""

    def __init__(self, params: Params, labels: list[str]):
        self.data, self.labels = params.data, labels
        self.split, self.source, self.hashes = array("b"), array("H"), bytearray()

    def add(self, split: str, source: int, row_id: str) -> None:
        self.split.append(SPLITS.index(split))
        self.source.append(source)
        self.hashes += hashlib.sha256(f"{self.data.split.seed}:mix:{row_id}".encode()).digest()

    def _keep(self) -> Any:
        """Whether each row read is in the mixture: each source's rows of the smallest hashes."""
        import numpy as np

        hashes = np.frombuffer(self.hashes, dtype=f"S{hashlib.sha256().digest_size}")
        source = np.frombuffer(self.source, dtype=np.uint16)
        counts = np.bincount(source, minlength=len(self.labels)).tolist()
        sources = list(zip(counts, self.data.sources or [], strict=True))
        weighted = [(n, src.weight) for n, src in sources if src.weight is not None]
        total = sum(w for _, w in weighted)
        # The largest mixture with these shares that takes no row twice.
        size = min((n / (w / total) for n, w in weighted), default=0.0)
        keep = np.ones(len(source), dtype=bool)
        for i, (n, src) in enumerate(sources):
            limit = n
            if src.weight is not None:
                limit = min(n, int(size * src.weight / total + MIX_ROUNDING))
            elif src.row_cap is not None:
                limit = min(n, src.row_cap)
            if limit < n:
                mine = source == i
                keep[mine] = False if limit == 0 else hashes[mine] <= np.sort(hashes[mine])[limit - 1]
        return keep

    def write(self, read: dict[str, Path], out: dict[str, Path]) -> dict[str, list[int]]:
        """Copies the kept lines of each `read` split file to `out`'s, and removes `read`'s;
        returns the rows kept per split, by source."""
        import numpy as np

        keep, source = self._keep(), np.frombuffer(self.source, dtype=np.uint16)
        split = np.frombuffer(self.split, dtype=np.int8)
        per_split = {}
        for index, name in enumerate(SPLITS):
            rows = np.flatnonzero(split == index)
            with read[name].open("rb") as lines, StreamingWriter(out[name]) as kept:
                for line, k in zip(streaming_lines(lines), keep[rows].tolist(), strict=True):
                    if k:
                        kept.write(line)
            read[name].unlink()
            per_split[name] = np.bincount(source[rows[keep[rows]]], minlength=len(self.labels)).tolist()
        return per_split


class _Ids:
    """The ids seen so far, for the duplicate check. The latest RECENT_IDS are a set of
    strings (about 90 bytes an id); older ones are 128-bit digests, 16 bytes an id (two ids
    share a digest with odds of about 1e-25 at ten million rows), in 2**ID_BUCKET_BITS byte strings
    chosen by a digest's leading bits. A lookup scans one bucket, a few dozen digests at ten
    million ids, in C: 1.4 µs an id at three million ids, where a binary search of one
    sorted array took 3.2 µs (missing the cache at every step) and each fold re-sorted
    every id seen. Before that, a bitmap of the older ids' str hashes (2**ID_FILTER_BITS
    bits) turns away most new ids without a digest: 0.35 µs to look up a new id at three
    million ids, against 1.2 µs without it; exact all the same (a set bit only sends the id
    on to its bucket)."""

    def __init__(self):
        self.recent: set[str] = set()
        self.buckets: list[bytes] = []
        self.filter = bytearray()

    @staticmethod
    def _digest(row_id: str) -> bytes:
        return hashlib.blake2b(row_id.encode(), digest_size=ID_DIGEST_BYTES).digest()

    @staticmethod
    def _bucket(digest: bytes) -> int:
        return int.from_bytes(digest[:4], "big") >> (32 - ID_BUCKET_BITS)

    def __contains__(self, row_id: str) -> bool:
        if row_id in self.recent:
            return True
        if not self.buckets:
            return False
        bit = hash(row_id) & ((1 << ID_FILTER_BITS) - 1)
        if not self.filter[bit >> 3] & (1 << (bit & 7)):
            return False
        digest = self._digest(row_id)
        bucket = self.buckets[self._bucket(digest)]
        at = bucket.find(digest)
        while at > 0 and at % ID_DIGEST_BYTES:  # a match across two digests is no match
            at = bucket.find(digest, at + 1)
        return at >= 0

    def add(self, row_id: str) -> None:
        self.recent.add(row_id)
        if len(self.recent) >= RECENT_IDS:
            self._fold()

    def _fold(self) -> None:
        """Moves the recent ids' digests to their buckets."""
        import numpy as np

        digests = np.array([self._digest(i) for i in self.recent], dtype=f"S{ID_DIGEST_BYTES}")
        bucket = digests.view(">u4")[::ID_DIGEST_BYTES // 4] >> (32 - ID_BUCKET_BITS)
        order = np.argsort(bucket, kind="stable")
        blob = digests[order].tobytes()
        bounds = (np.searchsorted(bucket[order], np.arange((1 << ID_BUCKET_BITS) + 1)) * ID_DIGEST_BYTES).tolist()
        if not self.buckets:
            self.buckets = [b""] * (1 << ID_BUCKET_BITS)
            self.filter = bytearray(1 << (ID_FILTER_BITS - 3))
        bits = np.fromiter(map(hash, self.recent), dtype=np.int64, count=len(self.recent)) & ((1 << ID_FILTER_BITS) - 1)
        np.bitwise_or.at(np.frombuffer(self.filter, dtype=np.uint8), bits >> 3, (1 << (bits & 7)).astype(np.uint8))
        for b in np.flatnonzero(np.diff(bounds)).tolist():
            self.buckets[b] += blob[bounds[b]:bounds[b + 1]]
        self.recent = set()


# Ids kept as strings before they are folded into the digests' buckets: trades memory (about
# 90 MB) for the count of folds (one per million rows).
RECENT_IDS = 1_000_000
ID_DIGEST_BYTES = 16
# 2**18 buckets: about 40 digests (640 bytes) to scan a lookup at ten million ids, for about
# 10 MB of bucket headers.
ID_BUCKET_BITS = 18
# 2**27 bits (16 MB, made at the first fold): at ten million ids about one bit in thirteen is
# set, so about one new id in thirteen is digested and looked for in its bucket.
ID_FILTER_BITS = 27


# A mixture's row ids are "<source label>/<id>": sources may reuse each other's ids.
MIX_SEPARATOR = "/"
# Shares are floored; this absorbs float error (0.3 * 10 / 0.3 is 9.999...).
MIX_ROUNDING = 1e-9


@dataclass
class _Counts:
    """What reading saw: every record, and the ones dropped, by reason."""

    rows_in: int = 0
    dropped: Counter[str] = field(default_factory=Counter)


def _row(part: Params, tpl: templates.Template | None, tokenizer: Any, where: str, record: dict[str, Any] | None,
         bad: str | None, prefix: str, index: int, seen_ids: _Ids) -> tuple[str, str, dict[str, Any]]:
    """A record's (row id, split key, example); BadRecord when it cannot be one."""
    if bad is not None:
        reason, _, message = bad.partition(": ")
        raise BadRecord(reason, f"{where}: {message}")
    assert record is not None
    example = to_example(part, tpl, tokenizer, where, record)
    d = part.data
    if d.id_column is None:
        # The rendered pair alone, as before chats kept their messages: a row keeps the split
        # it had.
        return f"{prefix}row{index}", json.dumps({k: v for k, v in example.items() if k != "messages"},
                                                 sort_keys=True), example
    if record.get(d.id_column) is None:
        raise BadRecord("missing_id", f"{where}: missing id column {d.id_column!r} "
                        "(set data.id_column: null if your data has none)")
    row_id = prefix + str(record[d.id_column])
    if row_id in seen_ids:
        raise BadRecord("duplicate_id", f"{where}: duplicate id {row_id!r}")
    # Only ids from a column can repeat (row<n> cannot): only they are kept.
    seen_ids.add(row_id)
    return row_id, row_id, example


def _examples(params: Params, parts: list[tuple[str | None, Params]],
              counts: _Counts) -> Iterator[tuple[str, int, str, dict[str, Any]]]:
    """Every record of every part, in reading order, as (split, source, row id, example); a
    bad record is dropped (and counted) or stops the stage, as its data.on_bad_record says."""
    seen_ids = _Ids()
    tokenizer = None
    for source, (label, part) in enumerate(parts):
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
                counts.rows_in += 1
                try:
                    row_id, key, example = _row(part, tpl, tokenizer, where, record, bad, prefix,
                                                counts.rows_in - 1, seen_ids)
                except BadRecord as err:
                    if d.on_bad_record == "error":
                        raise DataError(f"{err} (set data.on_bad_record: skip to drop such records)") from None
                    counts.dropped[err.reason] += 1
                    log.warning("skipped %s", err)
                    continue
                split = fixed_split or split_of(key, part)
                if split != "test":
                    example.pop("references", None)  # only evaluate reads them
                else:
                    example.pop("messages", None)  # evaluate generates the last turn from the prompt
                yield split, source, row_id, example


def run(params: Params, ws: Workspace) -> dict[str, Any]:
    counts = _Counts()
    parts = _parts(params)
    labels = [label for label, _ in parts if label is not None]
    mixture = _Mixture(params, labels) if labels else None
    rows_per_split = dict.fromkeys(SPLITS, 0)
    # Rows go to their split's file as they are read: memory holds one row, not the splits.
    # A mixture writes every row first and keeps its chosen ones once all are read.
    with atomic_path(ws.prepared) as tmp:
        tmp.mkdir()
        files = {s: tmp / f"{s}.jsonl" for s in SPLITS}
        read = files if mixture is None else {s: tmp / f"{s}.jsonl.unmixed" for s in SPLITS}
        with contextlib.ExitStack() as stack:
            out = {s: stack.enter_context(StreamingWriter(path)) for s, path in read.items()}
            for split, source, row_id, example in _examples(params, parts, counts):
                out[split].write((json.dumps({"id": row_id, **example}, ensure_ascii=False) + "\n").encode())
                rows_per_split[split] += 1
                if mixture is not None:
                    mixture.add(split, source, row_id)
        rows_in, dropped = counts.rows_in, counts.dropped
        d = params.data
        if rows_in == 0:
            raise DataError(f"data.path: {d.path} has no records" if d.sources is None else
                            "data.sources: no source has records")
        if mixture is not None:
            per_source = mixture.write(read, files)
            rows_per_split = {s: sum(n) for s, n in per_source.items()}
        leaked, leaks = leakage.check(files, d)
        if leaked["dropped"]:
            dropped["leakage"] += leaked["dropped"]
        for leak in leaks:
            rows_per_split[leak.split] -= 1
            if mixture is not None:
                per_source[leak.split][labels.index(leak.id.split(MIX_SEPARATOR, 1)[0])] -= 1
        for split, n in rows_per_split.items():
            if not n and (split != "validation" or d.split.validation_size > 0):
                raise DataError(f"the {split} split is empty ({rows_in} rows read, "
                                f"{sum(dropped.values())} dropped): add data or change data.split")
    stats: dict[str, Any] = {
        "rows_in": rows_in, "rows_out": sum(rows_per_split.values()),
        "rows_dropped": sum(dropped.values()), "dropped_by_reason": dict(sorted(dropped.items())),
        "rows_per_split": rows_per_split, "leakage": leaked}
    if mixture is not None:
        stats["rows_per_source"] = {label: {s: per_source[s][i] for s in SPLITS} for i, label in enumerate(labels)}
    write_json(ws.metrics("prepare"), stats)
    log.info("prepared %s", stats)
    return stats
