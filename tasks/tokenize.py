"""tokenize: turn prompt/completion pairs into input_ids + labels for causal-LM training.

Prompt tokens get label -100 (loss on the completion only, configurable), EOS is appended to
every completion, over-long rows are truncated or dropped and counted, and nothing is padded
here (the training collator pads each batch to its own longest row). The tokenizer is saved
alongside with a pad token distinct from EOS, so every later stage uses the same one.

Reads data/prepared/{train,validation}.jsonl; writes data/tokenized/ (save_to_disk + the
tokenizer), reports/label_preview.txt and metrics/tokenize.json.

    finetune tokenize
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from tasks import paths
from tasks.config import Params, TokenizeConfig
from tasks.errors import DataError, PipelineError
from tasks.io import atomic_path, read_jsonl, save_tokenizer, write_json
from tasks.modeling import load_tokenizer

log = logging.getLogger("finetune.tokenize")

IGNORE_INDEX = -100  # label value the loss skips (torch.nn.CrossEntropyLoss's ignore_index)
PAD_TOKEN = "<|pad|>"  # added only when the tokenizer has no usable pad token


def set_pad_token(tokenizer) -> str:
    """Give the tokenizer a pad token distinct from EOS; return what was done.

    A model trained with pad == EOS never learns to stop: the EOS label is masked with the
    padding. Prefer an existing pad token, then UNK, then add a new one.
    """
    if tokenizer.eos_token_id is None:
        raise PipelineError("model.name_or_path: the tokenizer has no EOS token; the model could "
                            "not learn where a completion ends")
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return f"kept pad token {tokenizer.pad_token!r}"
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
        return f"pad token set to the UNK token {tokenizer.unk_token!r} (was missing or EOS)"
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return f"added pad token {PAD_TOKEN!r} (was missing or EOS); the model's embeddings grow by one"


def encode_pair(prompt_ids: list[int], completion_ids: list[int], eos_id: int, bos_id: int | None,
                cfg: TokenizeConfig) -> dict[str, Any]:
    """One example: input_ids, labels and what truncation cut."""
    completion = [*completion_ids, eos_id]
    prompt = list(prompt_ids)
    prompt_cut = completion_cut = 0
    overflow = len(prompt) + len(completion) - cfg.max_length
    if overflow > 0:
        if cfg.truncation_side == "left":
            # Keep a leading BOS: the model has only ever seen sequences that start with it.
            head = prompt[:1] if prompt and prompt[0] == bos_id else []
            body = prompt[len(head):]
            prompt_cut = min(overflow, len(body))
            prompt = head + body[prompt_cut:]
            completion_cut = max(0, len(prompt) + len(completion) - cfg.max_length)
            if completion_cut:
                completion = completion[:len(completion) - completion_cut]
        else:
            completion_cut = min(overflow, len(completion))
            completion = completion[:len(completion) - completion_cut]
            prompt_cut = overflow - completion_cut
            prompt = prompt[:len(prompt) - prompt_cut]
    prompt_labels = [IGNORE_INDEX] * len(prompt) if cfg.completion_only_loss else list(prompt)
    return {"input_ids": prompt + completion, "labels": prompt_labels + completion,
            "prompt_cut": prompt_cut, "completion_cut": completion_cut,
            "eos_in_labels": bool(completion) and completion[-1] == eos_id,
            "trainable": sum(1 for t in prompt_labels + completion if t != IGNORE_INDEX)}


def prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    # A chat template writes BOS into the text itself; adding another would double it.
    bos = tokenizer.bos_token
    plain = [not (bos and p.startswith(bos)) for p in prompts]
    with_special = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    without = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    return [w if keep else wo for keep, w, wo in zip(plain, with_special, without, strict=True)]


def label_preview(tokenizer, example: dict[str, Any]) -> str:
    """The example's text with the trained span(s) wrapped in [[ ]]."""
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


def _tokenize_split(rows: list[dict[str, str]], tokenizer, cfg: TokenizeConfig, split: str):
    import datasets

    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id

    def encode_batch(batch: dict[str, list]) -> dict[str, list]:
        prompts = prompt_ids(tokenizer, batch["prompt"])
        completions = tokenizer(batch["completion"], add_special_tokens=False)["input_ids"]
        encoded = [encode_pair(p, c, eos, bos, cfg) for p, c in zip(prompts, completions, strict=True)]
        return {k: [e[k] for e in encoded] for k in encoded[0]} if encoded else {}

    # datasets fingerprints in-memory data at random; a content hash keeps save_to_disk's
    # output byte-identical across reruns, so DVC sees an unchanged output.
    fingerprint = hashlib.sha256(json.dumps([rows, cfg.model_dump(), tokenizer.name_or_path],
                                            sort_keys=True).encode()).hexdigest()[:16]
    ds = datasets.Dataset.from_list(rows).map(encode_batch, batched=True,
                                             remove_columns=["prompt", "completion"],
                                             desc=f"tokenize {split}", new_fingerprint=fingerprint)
    cut = [p + c > 0 for p, c in zip(ds["prompt_cut"], ds["completion_cut"], strict=True)]
    stats: dict[str, Any] = {
        "rows_in": len(ds),
        "rows_over_max_length": sum(cut),
        "prompt_tokens_cut": {"total": sum(ds["prompt_cut"]), "max": max(ds["prompt_cut"], default=0)},
        "completion_tokens_cut": {"total": sum(ds["completion_cut"]),
                                  "max": max(ds["completion_cut"], default=0)},
        "rows_without_eos_label": sum(not e for e in ds["eos_in_labels"]),
    }
    if cfg.overlong == "drop":
        ds = ds.filter(lambda row: row["prompt_cut"] + row["completion_cut"] == 0,
                       new_fingerprint=f"{fingerprint}-fits")
    else:
        empty = [i for i, n in zip(ds["id"], ds["trainable"], strict=True) if n == 0]
        if empty:
            raise DataError(f"{split} rows {empty[:5]} ({len(empty)} in all) have no trainable token "
                            f"left after truncation to tokenize.max_length={cfg.max_length}: raise "
                            "max_length, use truncation_side: left, or overlong: drop")
    if len(ds) == 0 and split == "train":
        raise DataError(f"no {split} rows left after tokenize.overlong=drop at max_length={cfg.max_length}")
    lengths = [len(x) for x in ds["input_ids"]]
    stats.update(rows_out=len(ds), rows_dropped=stats["rows_in"] - len(ds),
                 tokens=sum(lengths), trainable_tokens=sum(ds["trainable"]),
                 max_tokens=max(lengths, default=0),
                 mean_tokens=round(sum(lengths) / len(lengths), 2) if lengths else 0)
    ds = ds.remove_columns(["prompt_cut", "completion_cut", "eos_in_labels", "trainable"])
    return ds, stats


def run(params: Params) -> dict[str, Any]:
    import datasets

    cfg = params.tokenize
    tokenizer = load_tokenizer(params.model)
    pad_note = set_pad_token(tokenizer)
    log.info(pad_note)
    splits, stats = {}, {"pad_token": pad_note}
    for split in ("train", "validation"):
        rows = read_jsonl(paths.PREPARED / f"{split}.jsonl")
        if not rows:
            continue
        splits[split], stats[split] = _tokenize_split(rows, tokenizer, cfg, split)
        log.info("%s: %s", split, stats[split])
    with_eos = len(splits["train"]) - stats["train"]["rows_without_eos_label"]
    if with_eos == 0:
        raise DataError("no train row has EOS in its labels: the model would never learn to stop; "
                        "raise tokenize.max_length")
    with atomic_path(paths.TOKENIZED) as tmp:
        datasets.DatasetDict(splits).save_to_disk(str(tmp))
        save_tokenizer(tokenizer, tmp / paths.TOKENIZER.name)
    preview = [label_preview(tokenizer, splits["train"][i])
               for i in range(min(cfg.preview_rows, len(splits["train"])))]
    with atomic_path(paths.LABEL_PREVIEW) as tmp:
        tmp.write_text("The loss is on the text inside [[ ]]; the rest is context.\n\n"
                       + "\n\n-----\n\n".join(preview) + "\n", encoding="utf-8")
    write_json(paths.METRICS["tokenize"], stats)
    return stats
