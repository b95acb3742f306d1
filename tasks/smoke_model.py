"""Build an offline smoke model: a randomly initialised 2-layer model and a byte-level BPE
tokenizer trained on the sample data. `--arch` picks the architecture of a model.task: llama
(causal_lm, the default), t5 (seq2seq) or bert (an encoder for sequence_classification).

It exists so `make run` works with no network; it knows nothing until the pipeline trains
it. Real users point `model.name_or_path` at a Hub id or a local checkpoint instead.

    finetune smoke-model --data data/raw/dialogues.jsonl --out models/smoke-llama
    finetune smoke-model --arch t5 --out models/smoke-t5
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

# A minimal chat template so the `chat` prompt template works offline with the smoke model:
# `<|role|>\ncontent\n` per message, an assistant's content ending with EOS, and it and its
# EOS in {% generation %} so a multi-turn chat trains every assistant turn. The newline after
# a block tag is written as {{ '\n' }}: transformers renders with trim_blocks, which would drop it.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}" + SPECIAL_TOKENS["eos_token"]
    + "{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


# Special tokens an encoder's tokenizer puts around every text (as T5's and BERT's do).
POST_PROCESSORS = {"llama": None, "t5": "$A </s>", "bert": "<s> $A </s>"}


def build_tokenizer(texts: Iterable[str], vocab_size: int, arch: str = "llama"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
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
    if template := POST_PROCESSORS[arch]:
        specials = [(t, tok.token_to_id(t)) for t in ("<s>", "</s>") if t in template]
        tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _encoder_model(arch: str, tokenizer, hidden_size: int, num_hidden_layers: int,
                   num_attention_heads: int, initializer_range: float):
    from transformers import BertConfig, BertModel, T5Config, T5ForConditionalGeneration

    if arch == "t5":
        return T5ForConditionalGeneration(T5Config(
            vocab_size=len(tokenizer), d_model=hidden_size, d_kv=hidden_size // num_attention_heads,
            d_ff=hidden_size * 2, num_layers=num_hidden_layers, num_decoder_layers=num_hidden_layers,
            num_heads=num_attention_heads, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True, initializer_factor=1.0))
    return BertModel(BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, intermediate_size=hidden_size * 2,
        max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        initializer_range=initializer_range))


def build(texts: list[str], out: Path, *, arch: str = "llama", vocab_size: int = 1024,
          hidden_size: int = 128, num_hidden_layers: int = 2, num_attention_heads: int = 4,
          initializer_range: float = 0.1, seed: int = 0) -> Path:
    """Write a tokenizer and a randomly initialised model of `arch` to `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(texts, vocab_size, arch)
    out.mkdir(parents=True, exist_ok=True)
    if arch != "llama":
        torch.manual_seed(seed)
        _encoder_model(arch, tokenizer, hidden_size, num_hidden_layers, num_attention_heads,
                       initializer_range).save_pretrained(out)
        tokenizer.save_pretrained(out)
        return out
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
