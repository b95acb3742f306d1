"""Batched inference shared by evaluate, export, promote and predict: the base and tuned
models loaded as evaluate scores them, greedy generation for the generative tasks, class
predictions for sequence_classification.

Prompts are tokenized exactly as the tokenize stage did (same special tokens, same
truncation) and sorted by length so each batch carries little padding. A causal LM's
batches are left-padded (generation continues from the last position); an encoder's are
right-padded, as it was trained (absolute position embeddings would shift otherwise).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.config import Params
from tasks.encoding import prompt_ids, source_ids
from tasks.errors import PipelineError
from tasks.templates import stop_token_ids
from tasks.io import read_jsonl
from tasks.workspace import Workspace


def prompt_token_ids(tokenizer, prompts: list[str], max_prompt_length: int) -> list[list[int]]:
    out = []
    for ids in prompt_ids(tokenizer, prompts):
        if len(ids) > max_prompt_length:
            head = ids[:1] if ids[0] == tokenizer.bos_token_id else []
            ids = head + ids[len(ids) - max_prompt_length + len(head):]
        out.append(ids)
    return out


def input_ids(tokenizer, prompts: list[str], params: Params) -> list[list[int]]:
    """The model inputs of `prompts`, as tokenize built them for training."""
    if params.model.task == "causal_lm":
        return prompt_token_ids(tokenizer, prompts, params.tokenize.max_length - params.evaluate.max_new_tokens)
    return source_ids(tokenizer, prompts, params.tokenize)[0]


def _pad(row: list[int], filler: int, width: int, left: bool) -> list[int]:
    padding = [filler] * (width - len(row))
    return padding + row if left else row + padding


def batches(tokenizer, ids: list[list[int]], batch_size: int, pad_left: bool):
    """(original indices, input_ids, attention_mask) per batch, shortest prompts first."""
    import torch

    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(ids[i]) for i in idx)
        rows = [_pad(ids[i], tokenizer.pad_token_id, width, pad_left) for i in idx]
        mask = [_pad([1] * len(ids[i]), 0, width, pad_left) for i in idx]
        yield idx, torch.tensor(rows), torch.tensor(mask)


def model_batches(model, tokenizer, prompts: list[str], params: Params):
    """`batches` of the prompts' inputs, on the model's device and padded for its task."""
    device = next(model.parameters()).device
    ids = input_ids(tokenizer, prompts, params)
    for idx, ids_batch, mask in batches(tokenizer, ids, params.evaluate.per_device_eval_batch_size,
                                        pad_left=params.model.task == "causal_lm"):
        yield idx, ids_batch.to(device), mask.to(device)


def class_probabilities(model, tokenizer, prompts: list[str], params: Params) -> list[list[float]]:
    """Each prompt's probability of each of model.labels, in head order (sequence_classification)."""
    import torch
    from tqdm.auto import tqdm

    outputs: list[list[float]] = [[] for _ in prompts]
    with torch.inference_mode():
        progress = tqdm(total=len(prompts), desc="classify", unit="example")
        for idx, ids, mask in model_batches(model, tokenizer, prompts, params):
            progress.update(len(idx))
            probs = model(input_ids=ids, attention_mask=mask).logits.float().softmax(dim=-1).tolist()
            for i, row in zip(idx, probs, strict=True):
                outputs[i] = row
    return outputs


def most_likely(labels: list[str], probabilities: list[list[float]]) -> list[str]:
    return [labels[max(range(len(p)), key=p.__getitem__)] for p in probabilities]


def predict_labels(model, tokenizer, prompts: list[str], params: Params) -> list[str]:
    """The class name the model picks for each prompt (sequence_classification)."""
    return most_likely(params.model.labels or [], class_probabilities(model, tokenizer, prompts, params))


def generate(model, tokenizer, prompts: list[str], params: Params) -> list[str]:
    import torch
    from tqdm.auto import tqdm

    cfg = params.evaluate
    outputs: list[str] = [""] * len(prompts)
    with torch.inference_mode():
        progress = tqdm(total=len(prompts), desc="generate", unit="example")
        for idx, ids, mask in model_batches(model, tokenizer, prompts, params):
            progress.update(len(idx))
            try:
                generated = model.generate(
                    input_ids=ids, attention_mask=mask,
                    max_new_tokens=cfg.max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_token_ids(tokenizer))
            except torch.cuda.OutOfMemoryError:
                raise PipelineError("CUDA out of memory while generating: lower "
                                    "evaluate.per_device_eval_batch_size or evaluate.max_new_tokens") from None
            # A decoder-only model returns the prompt and its continuation; an encoder-decoder
            # only what its decoder wrote.
            new = generated if params.model.task == "seq2seq" else generated[:, ids.shape[1]:]
            for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True), strict=True):
                outputs[i] = text.strip()
    return outputs


def test_rows(params: Params, ws: Workspace) -> list[dict[str, Any]]:
    rows = read_jsonl(ws.prepared / "test.jsonl", required={"id": object, "prompt": str, "completion": str},
                      recover="rerun `dvc repro prepare`")
    return rows[:params.evaluate.max_samples] if params.evaluate.max_samples else rows


def load_base_and_tokenizer(params: Params, ws: Workspace, adapter: Path | None = None):
    """The base model, quantized as in training, and the tokenizer of `adapter` (default: the
    tuned adapter)."""
    from tasks.adapters import tuned_adapter
    from tasks.modeling import load_base, load_tokenizer, match_vocab

    tokenizer = load_tokenizer(params.model, str(adapter or tuned_adapter(params, ws)))
    base = load_base(params, quantized=params.quant.load_in_4bit)
    match_vocab(base, tokenizer)
    base.eval()
    return base, tokenizer


def attach_adapter(base, params: Params, ws: Workspace, adapter: Path | None = None):
    """`base` with `adapter` (default: SFT's, or the aligned one when align is on) on it,
    in place: no second copy of the weights."""
    from peft import PeftModel

    from tasks.adapters import tuned_adapter

    model = PeftModel.from_pretrained(base, str(adapter or tuned_adapter(params, ws)))
    model.eval()
    return model


def outputs(model, tokenizer, prompts: list[str], params: Params) -> list[str]:
    """What the model answers: generated text, or the class name it picks."""
    if params.model.task == "sequence_classification":
        return predict_labels(model, tokenizer, prompts, params)
    return generate(model, tokenizer, prompts, params)
