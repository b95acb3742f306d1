"""Writes data/raw/preferences.jsonl, the offline preference set for the align (DPO) stage.

Each pair takes a dialogue from data/raw/dialogues.jsonl: `chosen` is its own summary,
`rejected` the summary of another dialogue (fluent, but about the wrong people and plans),
which is the mistake a weak summarizer makes. Ids match the dialogues', so a pair is held out
exactly when its dialogue is (prepare's hash split).

    python scripts/make_preferences.py
"""

from __future__ import annotations

import json
from pathlib import Path

SOURCE = Path("data/raw/dialogues.jsonl")
OUT = Path("data/raw/preferences.jsonl")
PAIRS = 300
OFFSET = 7  # the rejected summary comes from the dialogue this many rows further on


def main() -> None:
    rows = [json.loads(line) for line in SOURCE.read_text(encoding="utf-8").splitlines() if line]
    with OUT.open("w", encoding="utf-8") as f:
        for i, row in enumerate(rows[:PAIRS]):
            other = rows[(i + OFFSET) % len(rows)]
            f.write(json.dumps({"id": row["id"], "dialogue": row["dialogue"], "chosen": row["summary"],
                                "rejected": other["summary"]}) + "\n")
    print(f"wrote {PAIRS} pairs to {OUT}")


if __name__ == "__main__":
    main()
