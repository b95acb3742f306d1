"""The baseline: preparing the in-memory way (what tasks/prepare.py and tasks/leakage.py did
before they streamed): every record read into a list and rendered, the hash split kept as
three lists, and the leakage check with every row's shingles and MinHash in one MinHashLSH
(datasketch), each held-out row queried before it is inserted; then the splits written.

The shipped dialogue_summary template and the hash split's shares; leaks are counted.
bench/run.py (prepare-scale) runs it beside `finetune prepare`.

    python bench/plain_prepare.py --data data/raw/dialogues.jsonl   # in a workspace
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from datasketch import MinHashLSH

from tasks.leakage import NUM_PERM, _minhash, normalize, shingles
from tasks.templates import render, resolve


def leaks(splits: dict[str, list[dict[str, str]]], threshold: float) -> list[tuple]:
    """(split, id, other split, other id, kind, similarity) of each held-out row whose prompt
    repeats one before it: the first exact twin, else the first normalized one, else the most
    similar LSH candidate at or above `threshold` (ties: the first "split/id")."""
    lsh, sets, exact, normal, found = MinHashLSH(threshold=threshold, num_perm=NUM_PERM), {}, {}, {}, []
    for split, rows in splits.items():
        for row in rows:
            key, norm = f"{split}/{row['id']}", normalize(row["prompt"])
            sets[key] = shingles(norm)
            signature = _minhash(sets[key])
            if split != "train":
                scored = sorted((-len(sets[key] & sets[k]) / len(sets[key] | sets[k]), k) for k in lsh.query(signature))
                if row["prompt"] in exact:
                    found.append((split, row["id"], *exact[row["prompt"]], "exact", 1.0))
                elif norm in normal:
                    found.append((split, row["id"], *normal[norm], "normalized", 1.0))
                elif scored and -scored[0][0] >= threshold:
                    found.append((split, row["id"], *scored[0][1].split("/"), "near", round(-scored[0][0], 4)))
            exact.setdefault(row["prompt"], (split, row["id"]))
            normal.setdefault(norm, (split, row["id"]))
            lsh.insert(key, signature)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="data/raw/dialogues.jsonl")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--validation-size", type=float, default=0.1)
    parser.add_argument("--test-size", type=float, default=0.1)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--out", default="data/plain-prepared")
    args = parser.parse_args()
    template = resolve("dialogue_summary", None)
    with open(args.data, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    splits: dict[str, list[dict[str, str]]] = {"train": [], "validation": [], "test": []}
    for r in records:
        prompt, completion = render(template, r, r["id"])
        u = int(hashlib.sha256(f"{args.seed}:{r['id']}".encode()).hexdigest()[:8], 16) / 2**32
        split = "test" if u < args.test_size else \
            "validation" if u < args.test_size + args.validation_size else "train"
        splits[split].append({"id": r["id"], "prompt": prompt, "completion": completion})
    leaked = leaks(splits, args.threshold)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with (out / f"{split}.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    print(json.dumps({"rows": {s: len(r) for s, r in splits.items()}, "leaks": len(leaked)}))


if __name__ == "__main__":
    main()
