"""Writes data/raw/reviews.jsonl, the offline sentiment set for sequence_classification.

Short product reviews labelled negative or positive, written from phrase banks with a fixed
seed. Not every review is one-sided: some state a drawback and then the verdict ("The screen
feels cheap, but the battery lasts for days."), some use negation ("is not bad at all"), so a
model has to read the sentence, not spot one word. The label is the verdict's polarity.

    python scripts/make_reviews.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path("data/raw/reviews.jsonl")
ROWS = 600
SEED = 13

ASPECTS = ["the battery", "the screen", "customer service", "the delivery", "the sound",
           "the price", "the build quality", "the setup", "the app", "the camera", "the fit",
           "the manual", "the charger", "the keyboard", "the packaging", "the warranty support"]
PREDICATES = {
    "positive": ["works perfectly", "exceeded my expectations", "is excellent", "lasts for days",
                 "is worth every penny", "holds up well", "feels solid", "is a joy to use",
                 "is not bad at all", "could hardly be better", "arrived ahead of schedule",
                 "is surprisingly good", "did exactly what was promised", "impressed me"],
    "negative": ["stopped working after a week", "is a letdown", "was a waste of money",
                 "feels cheap", "broke on the second day", "is painfully slow", "never showed up",
                 "is not good at all", "did not live up to the hype", "is far too loud",
                 "is flimsy", "disappointed me", "gave up within an hour", "is overpriced"],
}
OPENERS = ["", "Honestly, ", "Overall, ", "I have to say ", "After a month, ", "To be fair, "]
CLOSERS = {"positive": ["", "", "", "", " Would buy again.", " Recommended.", " Five stars."],
           "negative": ["", "", "", "", " Returning it.", " Avoid.", " One star."]}
OTHER = {"positive": "negative", "negative": "positive"}


def review(rng: random.Random, label: str) -> str:
    first, second = rng.sample(ASPECTS, 2)
    opener = rng.choice(OPENERS)
    shape = rng.random()
    if shape < 0.4:
        body = f"{first} {rng.choice(PREDICATES[label])}."
    elif shape < 0.7:
        body = f"{first} {rng.choice(PREDICATES[label])}, and {second} {rng.choice(PREDICATES[label])}."
    else:
        # A drawback (or a merit) first, then the verdict that decides the label.
        body = f"{first} {rng.choice(PREDICATES[OTHER[label]])}, but {second} {rng.choice(PREDICATES[label])}."
    text = opener + body
    return text[0].upper() + text[1:] + rng.choice(CLOSERS[label])


def main() -> None:
    rng = random.Random(SEED)
    with OUT.open("w", encoding="utf-8") as f:
        for i in range(ROWS):
            label = rng.choice(["negative", "positive"])
            f.write(json.dumps({"id": f"r{i:04d}", "text": review(rng, label), "label": label}) + "\n")
    print(f"wrote {ROWS} reviews to {OUT}")


if __name__ == "__main__":
    main()
