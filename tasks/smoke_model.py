"""Build the offline smoke model: a randomly initialised 2-layer Llama and a byte-level BPE
tokenizer trained on the sample data.

It exists so `make run` works with no network; it knows nothing until the pipeline trains
it. Real users point `model.name_or_path` at a Hub id or a local checkpoint instead.

    finetune smoke-model --data data/raw/dialogues.jsonl --out models/smoke-llama
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

# A minimal chat template so the `chat` prompt template works offline with the smoke model.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(texts: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(texts: list[str], out: Path, *, vocab_size: int = 1024, hidden_size: int = 128,
          num_hidden_layers: int = 2, num_attention_heads: int = 4, initializer_range: float = 0.1,
          seed: int = 0) -> Path:
    """Write a tokenizer and a randomly initialised LlamaForCausalLM to `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(texts, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Tied input/output embeddings let a frozen random model copy tokens (names, days)
        # from the prompt once LoRA learns where to attend; untied, LoRA alone barely learns.
        tie_word_embeddings=True,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def texts_from_jsonl(path: Path) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            # Ids are not text the model reads; training the vocabulary on them would waste it.
            texts.extend(str(v) for k, v in json.loads(line).items() if k != "id")
    return texts
