"""How text becomes token ids: the encoding rules tokenize trains on and generation prompts
with, in one place so training and inference see the same tokens (the pad token, the BOS a
chat template already wrote, loss masks, truncation)."""

from __future__ import annotations

from typing import Any

from tasks import templates
from tasks.config import TokenizeConfig
from tasks.errors import PipelineError

IGNORE_INDEX = -100  # label value the loss skips (torch.nn.CrossEntropyLoss's ignore_index)
PAD_TOKEN = "<|pad|>"  # added only when the tokenizer has no usable pad token


def set_pad_token(tokenizer, task: str = "causal_lm") -> str:
    """Give the tokenizer a pad token distinct from EOS; return what was done.

    A model trained with pad == EOS never learns to stop: the EOS label is masked with the
    padding. Prefer an existing pad token, then UNK, then add a new one. A classifier
    writes no text, so it needs no EOS, only a pad token.
    """
    if task == "sequence_classification" and tokenizer.pad_token_id is not None:
        return f"kept pad token {tokenizer.pad_token!r}"
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
            "trainable": len(completion) + (0 if cfg.completion_only_loss else len(prompt))}


def encode_chat(ids: list[int], mask: list[int], eos_id: int | list[int], bos_id: int | None,
                cfg: TokenizeConfig) -> dict[str, Any]:
    """One conversation: input_ids, labels on the tokens `mask` marks (every assistant turn,
    as the chat template's generation blocks end it), and what truncation cut. `eos_id`: the
    token, or tokens, that end a turn (templates.end_of_turn_ids), for eos_in_labels."""
    labels = [t if m or not cfg.completion_only_loss else IGNORE_INDEX
              for t, m in zip(ids, mask, strict=True)]
    overflow = len(ids) - cfg.max_length
    kept = range(len(ids))
    if overflow > 0:
        if cfg.truncation_side == "left":
            # Cut the earliest turns, keeping a leading BOS as encode_pair does.
            head = 1 if ids and ids[0] == bos_id else 0
            kept = [*range(head), *range(head + overflow, len(ids))]
        else:
            kept = range(cfg.max_length)
    cut = set(range(len(ids))) - set(kept)
    completion_cut = sum(labels[i] != IGNORE_INDEX for i in cut)
    ids, labels = [ids[i] for i in kept], [labels[i] for i in kept]
    trained = [t for t in labels if t != IGNORE_INDEX]
    return {"input_ids": ids, "labels": labels, "prompt_cut": len(cut) - completion_cut,
            "completion_cut": completion_cut,
            "eos_in_labels": any(t in trained for t in ([eos_id] if isinstance(eos_id, int) else eos_id)),
            "trainable": len(trained)}


def chat_ids(tokenizer, messages: list[dict[str, Any]], where: str) -> tuple[list[int], list[int]]:
    """A conversation's ids and assistant mask, with the special tokens the tokenizer puts in
    front of a text (BOS) unless the chat template wrote them: as prompt_ids does, so
    training and generation see the same start."""
    ids, mask = templates.assistant_mask(messages, tokenizer, where)
    lead = leading_special_ids(tokenizer)
    if lead and ids[:len(lead)] != lead:
        ids, mask = [*lead, *ids], [0] * len(lead) + mask
    return ids, mask


def leading_special_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer writes before a text (e.g. [BOS]; often none)."""
    with_special, plain = (token_ids(tokenizer, ["a"], add_special_tokens=s)[0] for s in (True, False))
    starts = (i for i in range(len(with_special) - len(plain) + 1)
              if with_special[i:i + len(plain)] == plain)
    return with_special[:next(starts, 0)]


def trains_conversation(row: dict[str, Any], marked: bool) -> bool:
    """Whether a prepared chat row is trained as a whole conversation (every assistant turn)
    rather than as its prompt/completion pair (the last turn). With a chat template that marks
    assistant turns, every chat row is, so all rows end their turns the template's way; without,
    one-turn chats keep their pair (the same training) and longer ones are refused."""
    return "messages" in row and (marked or templates.assistant_turns(row["messages"]) > 1)


def token_ids(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """Batched ids only: the fast tokenizer's Rust backend directly, skipping the attention
    masks and offsets `tokenizer(...)` would also build."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    if backend.padding is not None or backend.truncation is not None:
        # Some tokenizer.json files pad or cut every text (sentence-transformers' pad to 128);
        # the counts and cuts here must see the real lengths.
        backend.no_padding()
        backend.no_truncation()
    # encode_batch_fast (tokenizers >= 0.20) skips the character offsets nothing here reads:
    # the same ids, 15-30% sooner (BENCHMARKS.md).
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in encode(texts, add_special_tokens=add_special_tokens)]


def prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    # A chat template writes BOS into the text itself; adding another would double it.
    bos = tokenizer.bos_token
    has_bos = [bool(bos) and p.startswith(bos) for p in prompts]
    with_special = token_ids(tokenizer, prompts, add_special_tokens=True)
    if not any(has_bos):
        return with_special
    without = token_ids(tokenizer, prompts, add_special_tokens=False)
    return [wo if b else w for b, w, wo in zip(has_bos, with_special, without, strict=True)]


def source_ids(tokenizer, texts: list[str], cfg: TokenizeConfig) -> tuple[list[list[int]], list[int]]:
    """An encoder's or classifier's inputs: the tokenizer's own special tokens around each
    text (e.g. [CLS] ... [SEP], or ... </s>), cut to max_length at `truncation_side` by the
    tokenizer itself so those tokens stay. Returns the ids and the tokens cut per row."""
    ids = token_ids(tokenizer, texts, add_special_tokens=True)
    cut = [0] * len(ids)
    long = [i for i, row in enumerate(ids) if len(row) > cfg.max_length]
    if long:
        tokenizer.truncation_side = cfg.truncation_side
        short = tokenizer([texts[i] for i in long], truncation=True, max_length=cfg.max_length)["input_ids"]
        for i, row in zip(long, short, strict=True):
            cut[i], ids[i] = len(ids[i]) - len(row), row
    return ids, cut
