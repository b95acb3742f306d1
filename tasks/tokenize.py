"""tokenize: turn prompt/completion pairs into input_ids + labels for training.

By `model.task`:
- causal_lm: one sequence, prompt then completion; prompt tokens get label -100 (loss on the
  completion only, configurable) and EOS is appended to every completion. A chat row's
  `messages` are one sequence through the chat template, with every assistant turn trained
  (what its {% generation %} blocks mark, EOS included) and the rest masked.
- seq2seq: input_ids are the prompt (the encoder's input, with the tokenizer's own special
  tokens); labels are the completion's tokens plus EOS (what the decoder writes).
- sequence_classification: input_ids are the prompt; the label is the class's index in
  `model.labels`.
Over-long rows are truncated or dropped and counted, and nothing is padded here (the
training collator pads each batch to its own longest row). The tokenizer is saved
alongside with a pad token distinct from EOS, so every later stage uses the same one.

Reads data/prepared/{train,validation}.jsonl; writes data/tokenized/ (save_to_disk's layout +
the tokenizer), reports/label_preview.txt and metrics/tokenize.json. It streams: rows are read,
tokenized and written CHUNK_ROWS at a time (tasks/dataset_writer.py), and the stats are added
up as they pass, so memory stays flat however many rows there are.

    finetune tokenize
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tasks import templates
from tasks.config import Params
from tasks.encoding import (IGNORE_INDEX, chat_ids, encode_chat, encode_pair, prompt_ids,
                            set_pad_token, source_ids, token_ids, trains_conversation)
from tasks.errors import DataError
from tasks.io import atomic_path, iter_jsonl, save_tokenizer, write_json
from tasks.modeling import load_tokenizer
from tasks.workspace import Workspace

log = logging.getLogger("finetune.tokenize")

CHUNK_ROWS = 1000  # rows per batched tokenizer call (and per progress update)


def _encode_chunk(rows: list[dict[str, str]], tokenizer, params: Params) -> list[dict[str, Any]]:
    """The training example of each prepared row, for `model.task`."""
    cfg, task = params.tokenize, params.model.task
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if task == "causal_lm":
        marked = templates.marks_assistant_turns(tokenizer)
        turn_ends = templates.end_of_turn_ids(tokenizer)  # EOS, or ChatML's <|im_end|> too
        chats = [trains_conversation(r, marked) for r in rows]
        pairs = [r for r, chat in zip(rows, chats, strict=True) if not chat]
        prompts = prompt_ids(tokenizer, [r["prompt"] for r in pairs])
        completions = token_ids(tokenizer, [r["completion"] for r in pairs], add_special_tokens=False)
        encoded = iter([encode_pair(p, c, eos, bos, cfg) for p, c in zip(prompts, completions, strict=True)])
        out = []
        for r, chat in zip(rows, chats, strict=True):
            if chat:
                ids, mask = chat_ids(tokenizer, r["messages"], f"prepared row {r['id']!r}")
                out.append({"id": r["id"], **encode_chat(ids, mask, turn_ends, bos, cfg)})
            else:
                out.append({"id": r["id"], **next(encoded)})
        return out
    inputs, prompt_cut = source_ids(tokenizer, [r["prompt"] for r in rows], cfg)
    if task == "sequence_classification":
        labels = params.model.labels or []
        return [{"id": r["id"], "input_ids": ids, "labels": labels.index(r["completion"]),
                 "prompt_cut": cut, "completion_cut": 0, "eos_in_labels": True, "trainable": 1}
                for r, ids, cut in zip(rows, inputs, prompt_cut, strict=True)]
    out = []
    targets = token_ids(tokenizer, [r["completion"].strip() for r in rows], add_special_tokens=False)
    for r, ids, cut, target in zip(rows, inputs, prompt_cut, targets, strict=True):
        labels = [*target, eos][:cfg.max_length]
        out.append({"id": r["id"], "input_ids": ids, "labels": labels, "prompt_cut": cut,
                    "completion_cut": len(target) + 1 - len(labels),
                    "eos_in_labels": labels[-1] == eos, "trainable": len(labels)})
    return out


def label_preview(tokenizer, example: dict[str, Any], params: Params) -> str:
    """The example's text with what the loss is on wrapped in [[ ]]."""
    task = params.model.task
    if task == "sequence_classification":
        return f"{tokenizer.decode(example['input_ids'])} [[{(params.model.labels or [])[example['labels']]}]]"
    if task == "seq2seq":
        return f"{tokenizer.decode(example['input_ids'])} [[{tokenizer.decode(example['labels'])}]]"
    out, run, trained = [], [], None
    for tok, lab in zip(example["input_ids"], example["labels"], strict=True):
        is_trained = lab != IGNORE_INDEX
        if is_trained != trained and run:
            text = tokenizer.decode(run)
            out.append(f"[[{text}]]" if trained else text)
            run = []
        trained = is_trained
        run.append(tok)
    if run:
        text = tokenizer.decode(run)
        out.append(f"[[{text}]]" if trained else text)
    return "".join(out)


COLUMNS = ("id", "input_ids", "labels")


def features(task: str):
    """The saved columns' types: what Dataset.from_dict infers for them (datasets stores a
    column named input_ids as int32)."""
    from datasets import Features, List, Value

    label = Value("int64") if task == "sequence_classification" else List(Value("int64"))
    return Features({"id": Value("string"), "input_ids": List(Value("int32")), "labels": label})


# tokenize params that shape only reports/label_preview.txt: left out of the dataset's
# fingerprint, so changing one leaves data/tokenized's bytes (and DVC's hash, which train
# depends on) as they were.
REPORT_ONLY = frozenset({"preview_rows"})


class Fingerprint:
    """The dataset's fingerprint: sha256 of json.dumps([rows, tokenize params but
    REPORT_ONLY, task, labels, tokenizer], sort_keys=True), hashed as the rows stream by.
    datasets fingerprints in-memory data at random; a content hash keeps the saved output
    byte-identical across reruns, so DVC sees an unchanged output."""

    def __init__(self):
        self.hash, self.rows = hashlib.sha256(b"[["), 0

    def update(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        # One dumps per chunk: json.dumps(rows)[1:-1] is the rows' dumps joined by ", ", so
        # the hash is the same as row by row, without a Python call per row.
        self.hash.update(((", " if self.rows else "") + json.dumps(rows, sort_keys=True)[1:-1]).encode())
        self.rows += len(rows)

    def hexdigest(self, params: Params, tokenizer) -> str:
        rest = [params.tokenize.model_dump(exclude=REPORT_ONLY), params.model.task, params.model.labels,
                tokenizer.name_or_path]
        self.hash.update(("], " + json.dumps(rest, sort_keys=True)[1:]).encode())
        return self.hash.hexdigest()[:16]


def _chunks(rows: Iterable[dict[str, str]], size: int) -> Iterator[list[dict[str, str]]]:
    rows = iter(rows)
    while chunk := list(itertools.islice(rows, size)):
        yield chunk


class SplitStats:
    """A split's numbers for metrics/tokenize.json, added up chunk by chunk."""

    def __init__(self, labels: list[str] | None):
        self.rows_in = self.rows_over_max_length = self.rows_without_eos_label = 0
        self.prompt_cut, self.completion_cut = [0, 0], [0, 0]  # total, max
        self.rows_out = self.tokens = self.trainable_tokens = self.max_tokens = 0
        self.labels, self.per_label = labels, [0] * len(labels or [])

    def add(self, encoded: list[dict[str, Any]], kept: list[dict[str, Any]]) -> None:
        for e in encoded:
            self.rows_in += 1
            self.rows_over_max_length += e["prompt_cut"] + e["completion_cut"] > 0
            self.rows_without_eos_label += not e["eos_in_labels"]
            for acc, key in ((self.prompt_cut, "prompt_cut"), (self.completion_cut, "completion_cut")):
                acc[0], acc[1] = acc[0] + e[key], max(acc[1], e[key])
        for e in kept:
            self.rows_out += 1
            self.tokens += len(e["input_ids"])
            self.trainable_tokens += e["trainable"]
            self.max_tokens = max(self.max_tokens, len(e["input_ids"]))
            if self.labels is not None:
                self.per_label[e["labels"]] += 1

    def as_dict(self) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "rows_in": self.rows_in,
            "rows_over_max_length": self.rows_over_max_length,
            "prompt_tokens_cut": {"total": self.prompt_cut[0], "max": self.prompt_cut[1]},
            "completion_tokens_cut": {"total": self.completion_cut[0], "max": self.completion_cut[1]},
            "rows_without_eos_label": self.rows_without_eos_label,
            "rows_out": self.rows_out, "rows_dropped": self.rows_in - self.rows_out,
            "tokens": self.tokens, "trainable_tokens": self.trainable_tokens,
            "max_tokens": self.max_tokens,
            "mean_tokens": round(self.tokens / self.rows_out, 2) if self.rows_out else 0,
        }
        if self.labels is not None:
            stats["rows_per_label"] = dict(zip(self.labels, self.per_label, strict=True))
        return stats


def _tokenize_split(rows: Iterable[dict[str, str]], tokenizer, params: Params, split: str,
                    out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Tokenizes `rows` CHUNK_ROWS at a time and writes each chunk's examples to `out` (a
    save_to_disk folder) as it goes, so memory holds about one chunk whatever the split's
    size. Returns the split's stats and its first `preview_rows` examples."""
    from tqdm.auto import tqdm

    from tasks.dataset_writer import DatasetWriter

    cfg = params.tokenize
    stats, fingerprint = SplitStats(params.model.labels), Fingerprint()
    writer = DatasetWriter(out, features(params.model.task))
    empty, empty_rows = [], 0  # the first ids and the count of rows left with nothing to train
    first: list[dict[str, Any]] = []
    # Plain lists per chunk, not datasets.map: the stats read every row, and arrow row access
    # costs more than the tokenizing itself (bench/run.py tokenize).
    with tqdm(desc=f"tokenize {split}", unit="row") as progress:
        for chunk in _chunks(rows, CHUNK_ROWS):
            fingerprint.update(chunk)
            encoded = _encode_chunk(chunk, tokenizer, params)
            if cfg.overlong == "drop":
                kept = [e for e in encoded if e["prompt_cut"] + e["completion_cut"] == 0]
            else:
                kept = encoded
                ids = [e["id"] for e in encoded if e["trainable"] == 0]
                empty, empty_rows = (empty + ids)[:5], empty_rows + len(ids)
            stats.add(encoded, kept)
            first += kept[:max(0, cfg.preview_rows - len(first))]
            writer.write({c: [e[c] for e in kept] for c in COLUMNS})
            progress.update(len(chunk))
    if empty_rows:
        raise DataError(f"{split} rows {empty} ({empty_rows} in all) have no trainable token "
                        f"left after truncation to tokenize.max_length={cfg.max_length}: raise "
                        "max_length, use truncation_side: left, or overlong: drop")
    if not stats.rows_out and split == "train":
        raise DataError(f"no {split} rows left after tokenize.overlong=drop at max_length={cfg.max_length}")
    writer.close(fingerprint.hexdigest(params, tokenizer))
    return stats.as_dict(), first


def run(params: Params, ws: Workspace) -> dict[str, Any]:
    cfg = params.tokenize
    tokenizer = load_tokenizer(params.model)
    pad_note = set_pad_token(tokenizer, params.model.task)
    log.info(pad_note)
    stats: dict[str, Any] = {"pad_token": pad_note}
    splits, preview_examples = [], []
    with atomic_path(ws.tokenized) as tmp:
        for split in ("train", "validation"):
            rows = iter_jsonl(ws.prepared / f"{split}.jsonl")
            head = next(rows, None)
            if head is None:
                continue
            stats[split], examples = _tokenize_split(itertools.chain([head], rows), tokenizer, params,
                                                     split, tmp / split)
            splits.append(split)
            if split == "train":
                preview_examples = examples
            log.info("%s: %s", split, stats[split])
        with_eos = stats["train"]["rows_out"] - stats["train"]["rows_without_eos_label"]
        if with_eos == 0 and params.model.task != "sequence_classification":
            raise DataError("no train row has EOS in its labels: the model would never learn to stop; "
                            "raise tokenize.max_length")
        # What DatasetDict.save_to_disk writes beside its splits.
        (tmp / "dataset_dict.json").write_text(json.dumps({"splits": splits}), encoding="utf-8")
        save_tokenizer(tokenizer, tmp / ws.tokenizer.name)
    preview = [label_preview(tokenizer, e, params) for e in preview_examples[:cfg.preview_rows]]
    with atomic_path(ws.label_preview) as tmp:
        tmp.write_text("The loss is on the text inside [[ ]]; the rest is context.\n\n"
                       + "\n\n-----\n\n".join(preview) + "\n", encoding="utf-8")
    write_json(ws.metrics("tokenize"), stats)
    return stats
