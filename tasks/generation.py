"""Batched greedy generation shared by evaluate and export.

Prompts are tokenized exactly as the tokenize stage did (same BOS rule, same left
truncation), sorted by length so each batch carries little padding, left-padded, and
decoded with the KV cache on.
"""

from __future__ import annotations

from typing import Any

from tasks.config import Params
from tasks.errors import PipelineError


def prompt_token_ids(tokenizer, prompts: list[str], max_prompt_length: int) -> list[list[int]]:
    from tasks.tokenize import prompt_ids

    out = []
    for ids in prompt_ids(tokenizer, prompts):
        if len(ids) > max_prompt_length:
            head = ids[:1] if ids[0] == tokenizer.bos_token_id else []
            ids = head + ids[len(ids) - max_prompt_length + len(head):]
        out.append(ids)
    return out


def batches(tokenizer, ids: list[list[int]], batch_size: int):
    """(original indices, input_ids, attention_mask) per batch, shortest prompts first."""
    import torch

    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(ids[i]) for i in idx)
        input_ids = [[tokenizer.pad_token_id] * (width - len(ids[i])) + ids[i] for i in idx]
        mask = [[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in idx]
        yield idx, torch.tensor(input_ids), torch.tensor(mask)


def generate(model, tokenizer, prompts: list[str], params: Params) -> list[str]:
    import torch
    from tqdm.auto import tqdm

    cfg = params.evaluate
    ids = prompt_token_ids(tokenizer, prompts, params.tokenize.max_length - cfg.max_new_tokens)
    outputs: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    with torch.inference_mode():
        progress = tqdm(total=len(ids), desc="generate", unit="example")
        for idx, input_ids, mask in batches(tokenizer, ids, cfg.per_device_eval_batch_size):
            progress.update(len(idx))
            try:
                generated = model.generate(
                    input_ids=input_ids.to(device), attention_mask=mask.to(device),
                    max_new_tokens=cfg.max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            except torch.cuda.OutOfMemoryError:
                raise PipelineError("CUDA out of memory while generating: lower "
                                    "evaluate.per_device_eval_batch_size or evaluate.max_new_tokens") from None
            new = generated[:, input_ids.shape[1]:]
            for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True), strict=True):
                outputs[i] = text.strip()
    return outputs


def test_rows(params: Params) -> list[dict[str, Any]]:
    from tasks import paths
    from tasks.io import read_jsonl

    rows = read_jsonl(paths.PREPARED / "test.jsonl")
    return rows[:params.evaluate.max_samples] if params.evaluate.max_samples else rows
