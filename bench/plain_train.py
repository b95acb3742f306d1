"""The baseline: QLoRA fine-tuning written the way the usual tutorial does it.

transformers Trainer + PEFT LoRA on the 4-bit base, every example padded to max_length,
loss on the whole sequence. Same model, data, batch, steps and precision as the pipeline's
train stage, so bench/run.py can compare the two side by side.

    python bench/plain_train.py --params params.yaml --steps 40   # in a prepared workspace
"""

from __future__ import annotations

import argparse
import json

from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, Trainer, TrainingArguments
import datasets
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="models/smoke-llama")
    parser.add_argument("--data", default="data/prepared/train.jsonl")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--callback", help="import path of a TrainerCallback (bench/run.py's timer)")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ds = datasets.load_dataset("json", data_files=args.data, split="train")

    def tokenize(batch):
        texts = [p + c + tokenizer.eos_token for p, c in zip(batch["prompt"], batch["completion"])]
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=args.max_length)
        enc["labels"] = [[t if m else -100 for t, m in zip(ids, mask)]
                         for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
        return enc

    ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=bnb,
                                                 device_map={"": "cpu"}, dtype=torch.float32)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    callbacks = []
    if args.callback:
        module, name = args.callback.rsplit(":", 1)
        callbacks.append(getattr(__import__(module, fromlist=[name]), name)())
    trainer = Trainer(
        model=model, train_dataset=ds, callbacks=callbacks,
        args=TrainingArguments(output_dir="bench-plain-out", per_device_train_batch_size=args.batch_size,
                               max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="cosine",
                               warmup_steps=0.05, logging_steps=10, save_strategy="no",
                               gradient_checkpointing=True, optim="adamw_torch", seed=args.seed,
                               include_num_input_tokens_seen="non_padding", report_to="none",
                               use_cpu=not torch.cuda.is_available(), disable_tqdm=True),
    )
    trainer.train()
    print(json.dumps({"tokens_seen": trainer.state.num_input_tokens_seen}))


if __name__ == "__main__":
    main()
