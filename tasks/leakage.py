"""Train/test leakage: held-out prompts that also sit, under another id, in an earlier split.

Splits are compared in the order train < validation < test: each validation row against
train, each test row against train and validation. A held-out row leaks when its prompt is
- `exact`: byte-identical to a prompt of an earlier split,
- `normalized`: identical once case, whitespace and punctuation are ignored,
- `near`: the Jaccard similarity of the two prompts' word shingles (after normalizing) is at
  least `data.leakage_threshold`. Candidates come from MinHash LSH (datasketch, fixed seed,
  so the result is deterministic); each candidate's similarity is then computed exactly.

`data.on_leakage` says what prepare does with leaked rows: `warn` (log and count them), `drop`
(remove them from validation/test; train is never touched) or `error` (stop, naming them).
Called by prepare's run(); counts go to metrics/prepare.json under `leakage`.

A held-out row is also compared with the held-out rows before it (a test row with a
validation row, or with an earlier test row). It reads the split files prepare wrote and
keeps only the held-out rows' digests and shingle sketches in memory (about 350 bytes a row,
with the lookups' Bloom filters; their texts are read back from disk for the few rows a leak
or a candidate the sketches cannot rule out names): train, the large split, streams past
that index, so its size costs time, not memory.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import re
import unicodedata
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from tasks.config import DataConfig
from tasks.errors import DataError
from tasks.io import StreamingWriter, streaming_lines

log = logging.getLogger("finetune.prepare")

KINDS = ("exact", "normalized", "near")
# Word 3-grams: short enough that a light edit (a changed name or number) leaves most
# shingles of a 30-word prompt intact, long enough that two prompts sharing a vocabulary but
# not sentences score low.
SHINGLE_WORDS = 3
# MinHash permutations: the LSH banding's accuracy around the threshold; 128 is datasketch's
# default and hashing stays well under a second per thousand prompts.
NUM_PERM = 128
MINHASH_SEED = 1  # fixed: the same data always yields the same signatures and candidates
SHOWN_IN_ERROR = 5  # leaked rows named in the `error` message (the rest are counted)

_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Leak:
    split: str  # the held-out split the row is in
    id: str
    other_split: str  # the earlier split holding its twin
    other_id: str
    kind: str  # one of KINDS
    similarity: float  # Jaccard of the word shingles (1.0 for exact and normalized)

    def __str__(self) -> str:
        how = self.kind if self.kind != "near" else f"near, {self.similarity:.2f}"
        return f"{self.split}/{self.id} ~ {self.other_split}/{self.other_id} ({how})"


class _Blanked(dict):
    """str.translate's table for normalize: a punctuation or symbol character to a space,
    any other to itself, each character's category looked up once (translate runs in C, a
    loop over the characters in Python cost a fifth of prepare's time)."""

    def __missing__(self, code: int) -> str:
        char = chr(code)
        self[code] = " " if unicodedata.category(char)[0] in "PS" else char
        return self[code]


_BLANKED = _Blanked()


def normalize(text: str) -> str:
    """Lower case, punctuation and symbols removed, runs of whitespace made one space."""
    return _SPACE.sub(" ", text.casefold().translate(_BLANKED)).strip()


def shingles(normalized: str) -> set[str]:
    words = normalized.split()
    if len(words) <= SHINGLE_WORDS:
        return {" ".join(words)}
    return set(map(" ".join, zip(*(words[i:] for i in range(SHINGLE_WORDS)))))


@functools.cache
def _permutations() -> tuple[str, Any]:
    """MinHash's permutations for NUM_PERM and MINHASH_SEED, drawn once: MinHash draws them
    anew for every instance, which cost a sixth of prepare's time."""
    from datasketch import MinHash

    first = MinHash(num_perm=NUM_PERM, seed=MINHASH_SEED)
    return first.scheme, first.permutations


def _minhash(shingle_set: set[str]):
    from datasketch import MinHash

    scheme, permutations = _permutations()
    m = MinHash(num_perm=NUM_PERM, seed=MINHASH_SEED, scheme=scheme, permutations=permutations)
    m.update_batch([s.encode("utf-8") for s in shingle_set])  # a minimum: any order gives it
    return m


# Prompts, normalized prompts and LSH bands are compared by a 128-bit digest of their bytes:
# two different ones share a digest with odds of about 1e-25 at ten million rows, and a
# digest is 16 bytes where the text may be thousands.
DIGEST_BYTES = 16
DIGEST = f"S{DIGEST_BYTES}"  # numpy's fixed-width bytes: sortable, searchable
TRAIN_CHUNK_ROWS = 10_000  # train rows looked up in the held-out index per numpy call
# Held-out rows kept parsed (id and shingles, about 25 kB for a 1 kB prompt) while their near
# candidates are scored: candidates come in runs of the same few rows.
HELD_OUT_CACHE_ROWS = 1024


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def _bands(threshold: float) -> list[tuple[int, int]]:
    """The slices of a signature that MinHashLSH(threshold, NUM_PERM) bands: two prompts are
    near candidates exactly when one band of their signatures is equal, as its query finds."""
    from datasketch import MinHashLSH

    return MinHashLSH(threshold=threshold, num_perm=NUM_PERM).hashranges


def _digests(prompt: str, norm: str, shingle_set: set[str], bands: list[tuple[int, int]]) -> list[bytes]:
    """A prompt's digests (given it normalized, and its shingles): exact, normalized, and one
    per LSH band."""
    values = _minhash(shingle_set).hashvalues
    return [_digest(prompt.encode()), _digest(norm.encode()),
            *(_digest(values[start:end].tobytes()) for start, end in bands)]


def _sketch(shingle_set: set[str]) -> Any:
    """How many of the shingles fall in each of SKETCH_BUCKETS buckets by their str hash
    (SKETCH_FULL at most). Two prompts' shared shingles fall in the same buckets, so the sum
    over the buckets of the smaller count bounds the shared count from above: a near candidate
    whose bound is below the threshold is below it, without its held-out text being read.
    The hash is Python's, which differs from run to run; the bound holds for any hash, so the
    leaks found do not. A 1 kB prompt's sketch takes about 9 µs."""
    import numpy as np

    bucket = np.fromiter(map(hash, shingle_set), dtype=np.int64, count=len(shingle_set))
    bucket &= SKETCH_BUCKETS - 1
    counts = np.bincount(bucket, minlength=SKETCH_BUCKETS)
    if len(shingle_set) > SKETCH_FULL:  # only then can a bucket hold more
        np.minimum(counts, SKETCH_FULL, out=counts)
    return counts.astype(np.uint8)


def _may_reach(threshold: float, sketches: Any, sizes: Any, other_sketches: Any, other_sizes: Any) -> Any:
    """For each pair of prompts (row k of each argument), whether the Jaccard of their
    shingles may reach `threshold`: False only when the sketches' bound is below it. A bucket
    full in both sketches bounds nothing, so such a pair may."""
    import numpy as np

    shared = np.minimum(sketches, other_sketches).sum(axis=1, dtype=np.int64)
    # The same double division as the exact similarity's: a larger shared count cannot
    # give a smaller quotient.
    bound = shared / (sizes.astype(np.int64) + other_sizes - shared)
    return (bound >= threshold) | ((sketches == SKETCH_FULL) & (other_sketches == SKETCH_FULL)).any(axis=1)


# The sketch's buckets: with about a bucket a shingle (a 1 kB prompt has about 150), a pair
# of prompts at Jaccard 0.6 is bounded below 0.8. On ten million generated rows, 10 of 3,321
# near candidates at threshold 0.8 passed 64 buckets (2 truly at or above it), 74 passed 32.
# 64 bytes a held-out row.
SKETCH_BUCKETS = 64
SKETCH_FULL = 255  # a count kept in one byte: 255 stands for 255 or more


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(byte offset, row) of each line of a split file prepare wrote."""
    offset = 0
    with path.open("rb") as f:
        for line in streaming_lines(f):
            yield offset, json.loads(line)
            offset += len(line)


def _halves(keys: Any) -> tuple[Any, Any]:
    """A column of digests as two arrays of 64-bit numbers, first and last eight bytes
    (big-endian, so the pairs sort as the digests do)."""
    import numpy as np

    halves = np.ascontiguousarray(keys).view(">u8").reshape(-1, 2)
    return halves[:, 0].astype(np.uint64), halves[:, 1].astype(np.uint64)  # each a contiguous copy


class _Column:
    """One kind of key (exact, normalized or one band) of every held-out row, sorted once:
    the digests as two 64-bit halves, the rows in that order, and a Bloom filter: a bitmap
    with the bits that each half's leading bits name set. A lookup tests both of its bits
    first, two gathers from a few megabytes, so only the digests it lets through (about one
    absent digest in seventy, and the hits) are searched for; those are searched as numbers,
    in ascending order. 10,000 train rows take 0.4 ms at two hundred thousand held-out rows
    and 0.6 ms at two million; a search of every digest (both ends of its run) took 1.1 and
    2.1 ms, a search as 16-byte strings in row order 6.1 and 11.4 ms (every step of a search
    in a column outgrowing the cache misses it)."""

    def __init__(self, keys: Any):
        import numpy as np

        order = np.argsort(keys, kind="stable")  # stable: a key's rows stay in row order
        self.high, self.low = _halves(keys[order])
        self.order = order.astype(np.int32 if len(keys) < 2**31 else np.int64)
        new = (self.high[1:] != self.high[:-1]) | (self.low[1:] != self.low[:-1])
        self.starts = np.r_[True, new] if len(keys) else np.zeros(0, bool)  # where each key's run begins
        self.shift = np.uint64(64 - max(COLUMN_BITMAP_MIN_BITS, (len(keys) * COLUMN_BITMAP_BITS).bit_length()))
        flags = np.zeros(1 << (64 - int(self.shift)), dtype=bool)
        flags[self.high >> self.shift] = flags[self.low >> self.shift] = True
        self.bitmap = np.packbits(flags, bitorder="little")

    def _set(self, halves: Any) -> Any:
        """Whether the bitmap's bit for each of `halves` is set."""
        import numpy as np

        bit = halves >> self.shift
        return (self.bitmap[bit >> np.uint64(3)] >> (bit & np.uint64(7)).astype(np.uint8)) & 1

    def run_start(self) -> Any:
        """For each row, in row order, the sorted position where its key's run begins."""
        import numpy as np

        first = np.maximum.accumulate(np.where(self.starts, np.arange(len(self.starts)), 0))
        out = np.empty(len(first), dtype=self.order.dtype)
        out[self.order] = first
        return out

    def lookup(self, digests: list[bytes]) -> Iterator[tuple[int, int, Any]]:
        """(index into `digests`, where its run begins, the rows with that key) for each
        digest found, in the order of `digests`."""
        import numpy as np

        high, low = _halves(np.array(digests, dtype=DIGEST))
        maybe = np.flatnonzero(self._set(high) & self._set(low))
        maybe = maybe[np.argsort(high[maybe], kind="stable")]
        first = np.searchsorted(self.high, high[maybe], "left")
        inside = first < len(self.high)
        maybe, first = maybe[inside], first[inside]
        hit = self.high[first] == high[maybe]
        maybe, first = maybe[hit], first[hit]
        end = np.searchsorted(self.high, high[maybe], "right")
        by_index = np.argsort(maybe, kind="stable")
        # Whole runs of one key, unless two keys share the first half (odds of about 1e-7 at
        # two million rows): then the run holds both, ordered by their last half.
        for i, a, b in zip(maybe[by_index].tolist(), first[by_index].tolist(), end[by_index].tolist(), strict=True):
            if not (self.low[a] == low[i] and self.low[b - 1] == low[i]):
                lows = self.low[a:b]
                a, b = a + int(np.searchsorted(lows, low[i], "left")), a + int(np.searchsorted(lows, low[i], "right"))
                if a == b:
                    continue
            yield i, a, self.order[a:b]


# The lookup's Bloom filter: at least 2**COLUMN_BITMAP_MIN_BITS bits, and COLUMN_BITMAP_BITS or
# more a key, two set per key: 12% or fewer of the bits are set, and an absent key passes
# with odds of about 1 in 70. 4 MB a column at two million held-out rows, 44 MB for the eleven.
COLUMN_BITMAP_MIN_BITS = 16
COLUMN_BITMAP_BITS = 16


class _Index:
    """The held-out rows' digests, one sorted _Column per kind of key (exact, normalized,
    each band); rows are numbered in split then row order. The texts stay on disk, read back
    by offset for the few rows a candidate or a leak names."""

    def __init__(self, files: dict[str, Path], bands: list[tuple[int, int]]):
        import numpy as np

        self.splits = list(files)
        keys: list[bytearray] = [bytearray() for _ in range(2 + len(bands))]
        split_of, offsets, sketches, sizes = array("b"), array("q"), bytearray(), array("I")
        for s, split in enumerate(self.splits):
            for offset, row in _rows(files[split]):
                prompt = row["prompt"]
                norm = normalize(prompt)
                shingle_set = shingles(norm)
                for column, digest in zip(keys, _digests(prompt, norm, shingle_set, bands), strict=True):
                    column += digest
                sketches += _sketch(shingle_set).tobytes()
                sizes.append(len(shingle_set))
                split_of.append(s)
                offsets.append(offset)
        self.files, self.size, self.split_of, self.offsets = files, len(offsets), split_of, offsets
        # Each row's sketch and shingle count: near candidates below the threshold are told
        # apart from these, and only the rest are read back.
        self.sketches = np.frombuffer(sketches, dtype=np.uint8).reshape(-1, SKETCH_BUCKETS)
        self.sizes = np.frombuffer(sizes, dtype=np.uint32)
        # The unsorted keys go as each column is sorted: about 250 bytes a row stay.
        self.columns: list[_Column] = []
        for c in range(len(keys)):
            self.columns.append(_Column(np.frombuffer(keys[c], dtype=DIGEST)))
            keys[c] = bytearray()
        # Each row's group (where its key's run begins) for exact and normalized.
        self.group = [column.run_start() for column in self.columns[:2]]
        self._read = functools.lru_cache(maxsize=HELD_OUT_CACHE_ROWS)(self._row)
        self._open: dict[str, BinaryIO] = {}  # opened once: near candidates read thousands of rows

    def __enter__(self) -> _Index:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self._open.values():
            f.close()

    def _row(self, position: int) -> tuple[str, str, set[str]]:
        """(split, id, shingles) of held-out row `position`."""
        split = self.splits[self.split_of[position]]
        if split not in self._open:
            self._open[split] = self.files[split].open("rb")
        f = self._open[split]
        f.seek(self.offsets[position])
        row = json.loads(f.readline())
        return split, row["id"], shingles(normalize(row["prompt"]))

    def row(self, position: int) -> tuple[str, str, set[str]]:
        return self._read(position)

    def first_earlier(self, column: int) -> Any:
        """For each held-out row of an exact or normalized column, the first held-out row
        with its key, or -1 where that is the row itself."""
        import numpy as np

        first = self.columns[column].order[self.group[column]]
        return np.where(first == np.arange(self.size), -1, first)

    def groups(self, column: int) -> Iterator[Any]:
        """The held-out rows sharing a key, in row order, each group of two or more."""
        import numpy as np

        col = self.columns[column]
        starts = np.flatnonzero(col.starts)
        ends = np.r_[starts[1:], self.size]
        shared = ends - starts > 1  # most keys are one row's: no array is made for them
        for a, b in zip(starts[shared].tolist(), ends[shared].tolist(), strict=True):
            yield np.sort(col.order[a:b])

    def lookup(self, column: int, digests: list[bytes]) -> Iterator[tuple[int, int, Any]]:
        return self.columns[column].lookup(digests)


class _Near:
    """Each held-out row's best near match so far: the highest similarity at or above the
    threshold, ties going to the first key ("split/id") in sorted order."""

    def __init__(self, threshold: float):
        self.threshold, self.best = threshold, {}

    def add(self, position: int, mine: set[str], other_key: str, other: set[str]) -> None:
        shared = len(mine & other)
        similarity = shared / (len(mine) + len(other) - shared)  # the union's size, without making the union
        if similarity < self.threshold:
            return
        best = self.best.get(position)
        if best is None or similarity > best[0] or (similarity == best[0] and other_key < best[1]):
            self.best[position] = (similarity, other_key)


def find(files: dict[str, Path], threshold: float) -> list[Leak]:
    """Every held-out row whose prompt leaks from an earlier split, strongest match first
    per row (exact > normalized > near), in split then row order. `files` are the split
    files in split order; the first one (train) streams past an index of the others."""
    order = list(files)
    bands = _bands(threshold)
    with _Index({s: files[s] for s in order[1:]}, bands) as index:
        return _find(index, files[order[0]], order[0], threshold, bands)


def _find(index: _Index, train_file: Path, train: str, threshold: float,
          bands: list[tuple[int, int]]) -> list[Leak]:
    import numpy as np

    near = _Near(threshold)
    # A row with an exact or normalized twin needs no near match: its candidates are skipped
    # (which spares the pairs of a prompt repeated many times over).
    earlier = [index.first_earlier(column) for column in range(2)]
    settled = (earlier[0] >= 0) | (earlier[1] >= 0)
    # The id of the first train row with each held-out group's prompt (exact) and normalized prompt.
    first_train: list[dict[int, str]] = [{}, {}]
    train_rows = _rows(train_file)
    while chunk := list(itertools.islice(train_rows, TRAIN_CHUNK_ROWS)):
        # The normalized prompts are kept for the near candidates' shingles, made again for
        # those few rows: a chunk's shingles would take about 25 kB a row.
        norms = [normalize(row["prompt"]) for _, row in chunk]
        keys = [_digests(row["prompt"], norm, shingles(norm), bands)
                for (_, row), norm in zip(chunk, norms, strict=True)]
        for column, seen in enumerate(first_train):
            for i, group, rows in index.lookup(column, [k[column] for k in keys]):
                seen.setdefault(group, chunk[i][1]["id"])
                settled[rows] = True
        pairs: set[tuple[int, int]] = set()
        for column in range(2, len(index.columns)):
            for i, _, rows in index.lookup(column, [k[column] for k in keys]):
                pairs.update((int(p), i) for p in rows if not settled[p])
        if not pairs:
            continue
        candidates = sorted(pairs)
        train_shingles = {i: shingles(norms[i]) for _, i in candidates}
        train_sketches = {i: _sketch(shingle_set) for i, shingle_set in train_shingles.items()}
        held = np.array([position for position, _ in candidates])
        reach = _may_reach(threshold, index.sketches[held], index.sizes[held],
                           np.stack([train_sketches[i] for _, i in candidates]),
                           np.array([len(train_shingles[i]) for _, i in candidates]))
        for (position, i), may in zip(candidates, reach.tolist(), strict=True):
            if may:
                near.add(position, index.row(position)[2], f"{train}/{chunk[i][1]['id']}", train_shingles[i])
    # Held-out rows against the held-out rows before them.
    pairs = set()
    for column in range(2, len(index.columns)):
        for group in index.groups(column):
            pairs.update((int(b), int(a)) for j, b in enumerate(group) if not settled[b] for a in group[:j])
    candidates = sorted(pairs)
    first, second = np.array(candidates, dtype=np.int64).reshape(-1, 2).T
    reach = _may_reach(threshold, index.sketches[first], index.sizes[first], index.sketches[second], index.sizes[second])
    for (position, other), may in zip(candidates, reach.tolist(), strict=True):
        if not may:
            continue
        split, other_id, other_shingles = index.row(other)
        near.add(position, index.row(position)[2], f"{split}/{other_id}", other_shingles)
    return [leak for position in range(index.size)
            if (leak := _leak(position, index, first_train, earlier, near, train)) is not None]


def _leak(position: int, index: _Index, first_train: list[dict[int, str]], earlier: list[Any],
          near: _Near, train: str) -> Leak | None:
    """Held-out row `position`'s strongest match: the first row before it with the same
    prompt (train rows come first), else with the same normalized prompt, else its best near one."""
    for column, kind in enumerate(KINDS[:2]):
        train_id = first_train[column].get(int(index.group[column][position]))
        if train_id is not None:
            split, row_id, _ = index.row(position)
            return Leak(split, row_id, train, train_id, kind, 1.0)
        if earlier[column][position] >= 0:
            split, row_id, _ = index.row(position)
            other_split, other_id, _ = index.row(int(earlier[column][position]))
            return Leak(split, row_id, other_split, other_id, kind, 1.0)
    if position not in near.best:
        return None
    similarity, key = near.best[position]
    split, row_id, _ = index.row(position)
    other_split, _, other_id = key.partition("/")
    return Leak(split, row_id, other_split, other_id, "near", round(similarity, 4))


def check(files: dict[str, Path], data: DataConfig) -> tuple[dict[str, Any], list[Leak]]:
    """Finds leaked rows in the split files (in split order) and applies `data.on_leakage`
    (rewriting the held-out files without them for `drop`); returns the counts for
    metrics/prepare.json and the rows dropped."""
    leaks = find(files, data.leakage_threshold)
    counts = {kind: {s: 0 for s in list(files)[1:]} for kind in KINDS}
    for leak in leaks:
        counts[leak.kind][leak.split] += 1
    if leaks and data.on_leakage == "error":
        named = "; ".join(map(str, leaks[:SHOWN_IN_ERROR]))
        more = f" and {len(leaks) - SHOWN_IN_ERROR} more" if len(leaks) > SHOWN_IN_ERROR else ""
        raise DataError(f"data.on_leakage is error: {len(leaks)} held-out rows repeat a prompt of an "
                        f"earlier split: {named}{more} (remove them, or set data.on_leakage: drop)")
    for leak in leaks:
        log.warning("leakage: %s", leak)
    dropped = leaks if data.on_leakage == "drop" else []
    for split in {leak.split for leak in dropped}:
        leaked = {leak.id for leak in dropped if leak.split == split}
        path = files[split]
        kept = path.with_name(path.name + ".kept")
        with path.open("rb") as rows, StreamingWriter(kept) as out:
            for line in streaming_lines(rows):
                if json.loads(line)["id"] not in leaked:
                    out.write(line)
        kept.replace(path)
    report = {**counts, "rows": len(leaks), "dropped": len(dropped), "threshold": data.leakage_threshold}
    return report, dropped
