"""Writes data/lm_eval/smoke_mc.jsonl, the offline multiple-choice task of
data/lm_eval/smoke_mc.yaml (evaluate.lm_eval_tasks).

Everyday-knowledge questions with four choices, written for this project from small word
tables with a fixed seed: opposites, what comes next in a sequence, and what a thing is. It
shows the harness's own task format working offline; it is no benchmark (the smoke model is
random and scores about chance). Each row: {id, question, choices, answer} (answer: the index
of the right choice).

    python scripts/make_lm_eval_task.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path("data/lm_eval/smoke_mc.jsonl")
SEED = 7
CHOICES = 4

OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("open", "closed"),
             ("early", "late"), ("full", "empty"), ("light", "dark"), ("loud", "quiet"),
             ("happy", "sad"), ("young", "old"), ("wet", "dry"), ("high", "low")]
SEQUENCES = [("Monday", "Tuesday"), ("January", "February"), ("spring", "summer"),
             ("morning", "afternoon"), ("one", "two"), ("first", "second"),
             ("breakfast", "lunch"), ("Friday", "Saturday")]
KINDS = [("an apple", "a fruit"), ("a carrot", "a vegetable"), ("a dog", "an animal"),
         ("a rose", "a flower"), ("a hammer", "a tool"), ("a violin", "an instrument"),
         ("a bus", "a vehicle"), ("a shirt", "a piece of clothing")]


def questions(rng: random.Random) -> list[dict]:
    banks = [
        ("What is the opposite of {}?", OPPOSITES),
        ("What comes after {}?", SEQUENCES),
        ("What is {}?", KINDS),
    ]
    rows = []
    for template, pairs in banks:
        for cue, right in pairs:
            wrong = rng.sample([r for _, r in pairs if r != right], CHOICES - 1)
            choices = [right, *wrong]
            rng.shuffle(choices)
            rows.append({"question": template.format(cue), "choices": choices,
                         "answer": choices.index(right)})
    return [{"id": f"mc{i:03d}", **r} for i, r in enumerate(rows)]


def main() -> None:
    rows = questions(random.Random(SEED))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} questions to {OUT}")


if __name__ == "__main__":
    main()
