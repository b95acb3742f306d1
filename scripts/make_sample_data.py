"""Write the offline sample dataset: short two-person dialogues with one-line summaries.

The data is synthetic and written for this project (no third-party text), so the offline
default can show a real learning signal: every summary is derivable from its dialogue.

    python scripts/make_sample_data.py --rows 600 --out data/raw/dialogues.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack",
         "Kate", "Leo", "Maya", "Nina", "Oscar", "Paula", "Quinn", "Rosa", "Sam", "Tina"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
ACTIVITIES = ["go hiking", "watch a movie", "play tennis", "visit the museum", "go swimming",
              "have dinner", "study for the exam", "go shopping", "play chess", "go cycling"]
PLACES = ["the station", "the park", "the cafe", "the library", "the main square", "the gym"]
TIMES = ["8", "9", "10", "11", "noon", "2", "4", "6", "7"]
ITEMS = ["umbrella", "laptop charger", "bike", "blue jacket", "camera", "notebook", "guitar"]
FOODS = ["pizza", "sushi", "noodles", "burgers", "salad", "curry", "tacos"]


def _plan(rng: random.Random, a: str, b: str) -> tuple[str, str]:
    day, act, place, time = (rng.choice(DAYS), rng.choice(ACTIVITIES), rng.choice(PLACES),
                             rng.choice(TIMES))
    opener = rng.choice([f"Hey {b}, do you want to {act} on {day}?",
                         f"{b}, are you free on {day}? We could {act}.",
                         f"Hi {b}! Shall we {act} on {day}?"])
    lines = [f"{a}: {opener}",
             f"{b}: {rng.choice(['Sure!', 'Sounds great.', 'Yes, I would love to.'])} Where should we meet?",
             f"{a}: Let's meet at {place} at {time}.",
             f"{b}: {rng.choice(['Perfect, see you there.', 'OK, see you then.', 'Great, I will be there.'])}"]
    return "\n".join(lines), f"{a} and {b} will {act} on {day}. They will meet at {place} at {time}."


def _borrow(rng: random.Random, a: str, b: str) -> tuple[str, str]:
    item, day = rng.choice(ITEMS), rng.choice(DAYS)
    lines = [f"{a}: {b}, can I borrow your {item}?",
             f"{b}: {rng.choice(['Of course.', 'Yes, no problem.', 'Sure thing.'])} When do you need it?",
             f"{a}: On {day}. I will give it back the day after.",
             f"{b}: {rng.choice(['Fine by me.', 'OK, I will bring it.', 'Deal.'])}"]
    return "\n".join(lines), f"{b} will lend {a} the {item} on {day}."


def _lost(rng: random.Random, a: str, b: str) -> tuple[str, str]:
    item, place = rng.choice(ITEMS), rng.choice(PLACES)
    lines = [f"{a}: {rng.choice(['Have you seen my', 'Do you know where my', 'I cannot find my'])} {item}?",
             f"{b}: I think you left it at {place}.",
             f"{a}: {rng.choice(['Oh no!', 'Really?', 'Thanks!'])} I will go and get it.",
             f"{b}: {rng.choice(['Good luck.', 'Hurry, it closes soon.', 'I hope it is still there.'])}"]
    return "\n".join(lines), f"{a} lost the {item} at {place} and will go back for it."


def _food(rng: random.Random, a: str, b: str) -> tuple[str, str]:
    food, time = rng.choice(FOODS), rng.choice(TIMES)
    lines = [f"{a}: {rng.choice(['I am hungry.', 'I am starving.', 'Dinner time?'])} Should we order something?",
             f"{b}: How about {food}?",
             f"{a}: {rng.choice(['Yes, good idea.', 'Perfect.', 'I love it.'])} I will order for {time}.",
             f"{b}: {rng.choice(['Thanks!', 'Great.', 'Cool.'])}"]
    return "\n".join(lines), f"{a} and {b} will have {food}. {a} will order it for {time}."


def _reschedule(rng: random.Random, a: str, b: str) -> tuple[str, str]:
    old, new = rng.sample(DAYS, 2)
    lines = [f"{a}: {b}, I cannot make our meeting on {old}.",
             f"{b}: {rng.choice(['No worries.', 'That is OK.', 'Oh, pity.'])} Is {new} better?",
             f"{a}: Yes, {new} works for me.",
             f"{b}: {rng.choice(['Then it is settled.', 'Great, see you then.', 'OK, I will update the calendar.'])}"]
    return "\n".join(lines), f"{a} and {b} moved their meeting from {old} to {new}."


SCENES = [_plan, _borrow, _lost, _food, _reschedule]


def make_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.sample(NAMES, 2)
        dialogue, summary = rng.choice(SCENES)(rng, a, b)
        rows.append({"id": f"d{i:04d}", "dialogue": dialogue, "summary": summary})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("data/raw/dialogues.jsonl"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        for row in make_rows(args.rows, args.seed):
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
