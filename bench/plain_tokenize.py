"""The baseline: tokenizing for causal-LM fine-tuning the in-memory way (what tasks/tokenize.py
did before it streamed): every row read into a list, tokenized in batches into Python lists,
then one Dataset.from_dict and save_to_disk per split.

Prompt (with BOS) then completion + EOS, the prompt's start cut to fit max_length, the prompt
masked with -100. bench/run.py (tokenize-scale) runs it beside `finetune tokenize`.

    python bench/plain_tokenize.py --model models/smoke-llama --max-length 256   # in a prepared workspace
"""

from __future__ import annotations

import argparse
import json

from transformers import AutoTokenizer
import datasets

BATCH = 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="models/smoke-llama")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--out", default="data/plain-tokenized")
    args = parser.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    splits = {}
    for split in ("train", "validation"):
        with open(f"data/prepared/{split}.jsonl", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        cols: dict[str, list] = {"id": [], "input_ids": [], "labels": []}
        for start in range(0, len(rows), BATCH):
            chunk = rows[start:start + BATCH]
            prompts = tok([r["prompt"] for r in chunk])["input_ids"]
            completions = tok([r["completion"] for r in chunk], add_special_tokens=False)["input_ids"]
            for r, p, c in zip(chunk, prompts, completions):
                c = c + [tok.eos_token_id]
                p = p[:1] + p[1 + max(0, len(p) + len(c) - args.max_length):]
                cols["id"].append(r["id"])
                cols["input_ids"].append(p + c)
                cols["labels"].append([-100] * len(p) + c)
        splits[split] = datasets.Dataset.from_dict(cols)
    datasets.DatasetDict(splits).save_to_disk(args.out)


if __name__ == "__main__":
    main()
