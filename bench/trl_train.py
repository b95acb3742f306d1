"""The peer: QLoRA supervised fine-tuning written by hand with TRL's SFTTrainer.

This is the plain TRL recipe a user would write from the tutorials instead of using the
pipeline: load the prepared prompt/completion pairs with `datasets`, load the model in 4-bit
NF4 with double quantization (bitsandbytes), hand a `peft.LoraConfig` and a `trl.SFTConfig`
to `trl.SFTTrainer`, train, evaluate on the validation split, save the adapter. TRL does the
rest its own way: it tokenizes prompt + completion, appends EOS, masks the prompt
(completion-only loss), pads each batch to its longest row, computes the loss with its
chunked LM head and, because the base is 4-bit, casts the LoRA weights to bfloat16 (the
QLoRA paper's recipe). No pipeline code is imported, so none of the pipeline's environment
pins (tasks/__init__.py) apply either.

Every setting it shares with the pipeline comes from params.yaml, read with yaml directly:
the model, quant.*, lora.*, tokenize.max_length and completion_only_loss, and train.* (steps,
batch, accumulation, learning rate and schedule, warmup, weight decay, clipping, seed,
gradient checkpointing, logging and checkpoint steps). `train.precision: auto` and the CUDA-only
optimizers are resolved as the pipeline resolves them (fp32 and adamw_torch_fused on a CPU);
`train.gradient_checkpointing: auto` is the pipeline's decision, so the script keeps TRL's
default there (on).

    python bench/trl_train.py                      # in a prepared workspace (data/prepared/)
    python bench/trl_train.py --steps 40 --callback bench.run:StepTimer --no-save

Prints one JSON line: train_runtime (the Trainer's own), tokens_seen (non-padding tokens, the
Trainer's include_num_input_tokens_seen="non_padding": the attention mask's sum, as the
pipeline's metrics/train.json tokens_seen counts them), tokens_per_s = tokens_seen /
train_runtime, and wall_s, the whole process from its first line (imports, loading,
tokenizing, training, evaluation, saving).
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402

import datasets  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402


def precision(setting: str) -> str:
    """train.precision as the pipeline resolves it: auto is bf16 on a GPU that has it, fp16 on
    other CUDA GPUs, fp32 on a CPU."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--steps", type=int, help="override train.max_steps")
    parser.add_argument("--output-dir", help="checkpoints and the adapter (default: a temporary folder)")
    parser.add_argument("--no-save", action="store_true", help="no checkpoints, no adapter, no evaluation")
    parser.add_argument("--callback", help="import path of a TrainerCallback (bench/run.py's timer)")
    parser.add_argument("--out", help="also write the JSON result to this file")
    parser.add_argument("--fp32-adapters", action="store_true",
                        help="not the recipe, a diagnostic: undo SFTTrainer's cast of a 4-bit model's "
                             "adapter weights to bfloat16 (on a CPU without native bf16 those matmuls "
                             "are several times slower than fp32 ones)")
    args = parser.parse_args()

    with open(args.params) as f:
        params = yaml.safe_load(f)
    model_p, quant, lora, tok_p, train = (params[k] for k in ("model", "quant", "lora", "tokenize", "train"))
    prec = precision(train["precision"])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[prec]
    if quant.get("bnb_4bit_compute_dtype", "auto") != "auto":
        compute_dtype = getattr(torch, quant["bnb_4bit_compute_dtype"])
    else:
        compute_dtype = dtype
    on_cuda = torch.cuda.is_available()
    optim = train["optim"] if on_cuda or not ("8bit" in train["optim"] or "paged" in train["optim"]) \
        else "adamw_torch_fused"

    # Data: the prepare stage's prompt/completion pairs, as they are.
    files = {"train": f"{args.data}/train.jsonl"}
    if not args.no_save and os.path.exists(f"{args.data}/validation.jsonl"):
        files["validation"] = f"{args.data}/validation.jsonl"
    data = datasets.load_dataset("json", data_files=files)
    data = data.select_columns(["prompt", "completion"])

    tokenizer = AutoTokenizer.from_pretrained(model_p["name_or_path"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    bnb = BitsAndBytesConfig(load_in_4bit=quant["load_in_4bit"], bnb_4bit_quant_type=quant["bnb_4bit_quant_type"],
                             bnb_4bit_use_double_quant=quant["bnb_4bit_use_double_quant"],
                             bnb_4bit_compute_dtype=compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_p["name_or_path"], quantization_config=bnb, dtype=dtype,
        attn_implementation=model_p.get("attn_implementation") or "sdpa",
        device_map={"": 0} if on_cuda else {"": "cpu"})
    peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["lora_alpha"], lora_dropout=lora["lora_dropout"],
                             target_modules=lora["target_modules"], bias=lora.get("bias", "none"),
                             task_type="CAUSAL_LM")

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="trl-sft-")
    steps = args.steps or train["max_steps"]
    config = SFTConfig(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=train["per_device_train_batch_size"],
        gradient_accumulation_steps=train["gradient_accumulation_steps"],
        learning_rate=train["learning_rate"],
        lr_scheduler_type=train["lr_scheduler_type"],
        warmup_steps=train["warmup_steps"],
        weight_decay=train["weight_decay"],
        max_grad_norm=train["max_grad_norm"],
        optim=optim,
        seed=train["seed"],
        bf16=prec == "bf16", fp16=prec == "fp16",
        # "auto" is the pipeline's own choice (from its memory estimate); a plain script keeps
        # TRL's default, which is on.
        gradient_checkpointing=train["gradient_checkpointing"] in (True, "auto"),
        max_length=tok_p["max_length"],
        completion_only_loss=tok_p["completion_only_loss"],
        logging_steps=train["logging_steps"],
        save_strategy="no" if args.no_save else "steps",
        save_steps=train["save_steps"],
        save_total_limit=train["save_total_limit"],
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        use_cpu=not on_cuda,
        disable_tqdm=True,
    )
    callbacks = []
    if args.callback:
        module, name = args.callback.rsplit(":", 1)
        callbacks.append(getattr(__import__(module, fromlist=[name]), name)())
    trainer = SFTTrainer(model=model, args=config, train_dataset=data["train"],
                         eval_dataset=data.get("validation"), processing_class=tokenizer,
                         peft_config=peft_config, callbacks=callbacks)
    if args.fp32_adapters:
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    result = trainer.train()
    eval_loss = None
    if not args.no_save:
        if trainer.eval_dataset is not None:
            eval_loss = trainer.evaluate()["eval_loss"]
        trainer.save_model(os.path.join(output_dir, "adapter"))
    runtime = result.metrics["train_runtime"]
    tokens = trainer.state.num_input_tokens_seen
    out = {"impl": "trl-fp32-adapters" if args.fp32_adapters else "trl", "train_runtime": round(runtime, 3), "tokens_seen": tokens,
           "tokens_per_s": round(tokens / runtime, 1), "steps": result.global_step,
           "train_loss": result.training_loss, "eval_loss": eval_loss,
           "wall_s": round(time.perf_counter() - START, 2)}
    print(json.dumps(out), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
