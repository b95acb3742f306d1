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
"""

from __future__ import annotations

import logging
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from tasks.config import DataConfig
from tasks.errors import DataError

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


def normalize(text: str) -> str:
    """Lower case, punctuation and symbols removed, runs of whitespace made one space."""
    kept = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text.casefold())
    return _SPACE.sub(" ", kept).strip()


def shingles(normalized: str) -> set[str]:
    words = normalized.split()
    if len(words) <= SHINGLE_WORDS:
        return {" ".join(words)}
    return {" ".join(words[i:i + SHINGLE_WORDS]) for i in range(len(words) - SHINGLE_WORDS + 1)}


def _minhash(shingle_set: set[str]):
    from datasketch import MinHash

    m = MinHash(num_perm=NUM_PERM, seed=MINHASH_SEED)
    m.update_batch([s.encode("utf-8") for s in sorted(shingle_set)])
    return m


def find(splits: dict[str, list[dict[str, str]]], threshold: float) -> list[Leak]:
    """Every held-out row whose prompt leaks from an earlier split, strongest match first
    per row (exact > normalized > near), in split then row order."""
    from datasketch import MinHashLSH

    order = list(splits)
    exact: dict[str, tuple[str, str]] = {}
    normal: dict[str, tuple[str, str]] = {}
    sets: dict[str, set[str]] = {}
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    leaks: list[Leak] = []
    for split in order:
        for row in splits[split]:
            key = f"{split}/{row['id']}"
            norm = normalize(row["prompt"])
            sets[key] = shingles(norm)
            signature = _minhash(sets[key])
            if split != order[0]:
                leak = _match(split, row, norm, sets, signature, exact, normal, lsh, threshold)
                if leak is not None:
                    leaks.append(leak)
            # Rows are indexed after the lookup: a split is compared with the earlier ones only.
            exact.setdefault(row["prompt"], (split, row["id"]))
            normal.setdefault(norm, (split, row["id"]))
            lsh.insert(key, signature)
    return leaks


def _match(split: str, row: dict[str, str], norm: str, sets: dict[str, set[str]], signature,
           exact: dict[str, tuple[str, str]], normal: dict[str, tuple[str, str]], lsh,
           threshold: float) -> Leak | None:
    if row["prompt"] in exact:
        return Leak(split, row["id"], *exact[row["prompt"]], "exact", 1.0)
    if norm in normal:
        return Leak(split, row["id"], *normal[norm], "normalized", 1.0)
    mine = sets[f"{split}/{row['id']}"]
    best: tuple[float, str] | None = None
    for key in sorted(lsh.query(signature)):
        other = sets[key]
        similarity = len(mine & other) / len(mine | other)
        if similarity >= threshold and (best is None or similarity > best[0]):
            best = (similarity, key)
    if best is None:
        return None
    other_split, _, other_id = best[1].partition("/")
    return Leak(split, row["id"], other_split, other_id, "near", round(best[0], 4))


def check(splits: dict[str, list[dict[str, str]]], data: DataConfig) -> dict[str, Any]:
    """Finds leaked rows and applies `data.on_leakage` (removing rows from `splits` in place
    for `drop`); returns the counts for metrics/prepare.json."""
    leaks = find(splits, data.leakage_threshold)
    counts = {kind: {s: 0 for s in list(splits)[1:]} for kind in KINDS}
    for leak in leaks:
        counts[leak.kind][leak.split] += 1
    if leaks and data.on_leakage == "error":
        named = "; ".join(map(str, leaks[:SHOWN_IN_ERROR]))
        more = f" and {len(leaks) - SHOWN_IN_ERROR} more" if len(leaks) > SHOWN_IN_ERROR else ""
        raise DataError(f"data.on_leakage is error: {len(leaks)} held-out rows repeat a prompt of an "
                        f"earlier split: {named}{more} (remove them, or set data.on_leakage: drop)")
    for leak in leaks:
        log.warning("leakage: %s", leak)
    dropped = 0
    if data.on_leakage == "drop":
        leaked = {(leak.split, leak.id) for leak in leaks}
        for split, rows in splits.items():
            kept = [r for r in rows if (split, r["id"]) not in leaked]
            dropped += len(rows) - len(kept)
            rows[:] = kept
    return {**counts, "rows": len(leaks), "dropped": dropped, "threshold": data.leakage_threshold}
