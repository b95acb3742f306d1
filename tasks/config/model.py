"""The base model and how it is adapted: model.*, quant.*, lora.* and peft.*."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tasks.config.base import MODELS_DIR, Section


TASKS = ("causal_lm", "seq2seq", "sequence_classification")


class ModelConfig(Section):
    task: Literal[TASKS] = Field("causal_lm", description=(
        "What the model learns, and with it the auto class: causal_lm, seq2seq or "
        "sequence_classification. With causal_lm, AutoModelForCausalLM continues the prompt; "
        "seq2seq: AutoModelForSeq2SeqLM (T5, BART, ...), whose encoder reads the prompt and decoder writes "
        "the completion; sequence_classification: AutoModelForSequenceClassification, where a new "
        "head picks one of labels."))
    labels: list[str] | None = Field(None, description=(
        "sequence_classification only (required there, refused elsewhere): two or more class "
        "names, in head order. A record's completion must render to a name or to its index "
        "(0, 1, ...), so integer-coded datasets work as they are; anything else is a bad record "
        "naming its line."))
    name_or_path: str = Field("models/smoke-llama", description=(
        "A Hub id (e.g. HuggingFaceTB/SmolLM2-360M) or a local directory under models/, "
        "loadable with the task's auto class. A model is local if its path exists, is "
        "absolute, or starts with '.' or models/."))
    revision: str | None = Field(None, description=(
        "Hub tag or commit sha: required for Hub ids, so reruns use the same weights."))
    chat_template: str | None = Field(None, description=(
        "A Jinja file under models/ whose text replaces the tokenizer's chat template; null: the "
        "tokenizer's own. The prepare and tokenize stages read it, and the tokenizer tokenize "
        "saves carries it on to the adapter and the export. With prompt.template chat every "
        "assistant turn is trained as the template's {% generation %} blocks mark it; a ChatML "
        "template without them gets them added."))
    trust_remote_code: bool = Field(False, description=(
        "Run model code shipped with the checkpoint (config.json's auto_map): only if you have "
        "read it and trust it. A warning is logged when this is on."))
    allow_pickle_weights: bool = Field(False, description=(
        "Load pickle .bin/.pt weights, which can run code when loaded; false: safetensors only. "
        "Logged when on."))
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field("sdpa", description=(
        "Attention kernel; flash_attention_2 needs the flash-attn package, which is not a "
        "dependency."))
    cpu_math: Literal["portable", "native"] = Field("portable", description=(
        "CPU runs: portable holds MKL, oneDNN and ATen to one code path (MKL single-threaded), "
        "so any x86-64 machine, Intel or AMD, computes the committed dvc.lock's bytes; native "
        "lets each take this CPU's fastest path (matmuls 2-4x faster, outputs differ between "
        "machines in the last digits). No effect on what a GPU computes."))

    @property
    def is_local(self) -> bool:
        p = Path(self.name_or_path)
        return p.exists() or p.is_absolute() or self.name_or_path.startswith(".") \
            or p.parts[0] == MODELS_DIR.name

    @model_validator(mode="after")
    def _source(self) -> ModelConfig:
        p = Path(self.name_or_path)
        if self.is_local:
            if p.is_absolute() or ".." in p.parts or p.parts[0] != MODELS_DIR.name:
                raise ValueError(f"a local model must be under {MODELS_DIR}/ (dvc.yaml tracks that "
                                 f"folder), got {self.name_or_path!r}")
        elif self.revision is None:
            raise ValueError(f"{self.name_or_path!r} is a Hub id: pin `revision` (a tag or commit "
                             "sha) so reruns use the same weights")
        if self.task == "sequence_classification":
            if not self.labels or len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
                raise ValueError("task sequence_classification needs `labels`: two or more distinct "
                                 "class names, e.g. [negative, positive]")
        elif self.labels is not None:
            raise ValueError(f"labels is for task sequence_classification only (task is {self.task}); "
                             "remove it")
        return self

    @field_validator("chat_template")
    @classmethod
    def _chat_template_file(cls, value: str | None) -> str | None:
        if value is None:
            return value
        p = Path(value)
        if p.is_absolute() or ".." in p.parts or not p.parts or p.parts[0] != MODELS_DIR.name:
            raise ValueError(f"a chat template file must be under {MODELS_DIR}/ (dvc.yaml tracks that "
                             f"folder), got {value!r}: copy it there")
        if not p.is_file():
            what = "is a folder, not a file" if p.is_dir() else "does not exist"
            raise ValueError(f"{value} {what}: name a Jinja chat template file under {MODELS_DIR}/, e.g. "
                             f"{MODELS_DIR}/NAME/chat_template.jinja")
        return value

    @field_validator("labels", mode="before")
    @classmethod
    def _label_names(cls, value: Any) -> Any:
        # YAML reads [0, 1] as numbers; class names are text.
        return [str(v) for v in value] if isinstance(value, list) else value


Dtype = Literal["auto", "bfloat16", "float16", "float32"]


class QuantConfig(Section):
    load_in_4bit: bool = Field(True, description=(
        "QLoRA: a 4-bit base (bitsandbytes) plus trained adapters; false: the adapters train on "
        "the unquantized base."))
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description=(
        "4-bit data type: nf4 (as in the QLoRA paper) or fp4."))
    bnb_4bit_use_double_quant: bool = Field(True, description=(
        "Quantize the quantization constants too (about 0.4 bit per parameter saved)."))
    bnb_4bit_compute_dtype: Dtype = Field("auto", description=(
        "Dtype of the 4-bit layers' matmuls; auto follows the resolved train.precision (bf16: "
        "bfloat16, fp16: float16, fp32: float32)."))


class LoraConfig(Section):
    r: int = Field(16, ge=1, description=(
        "Adapter rank, at least 1. DoRA, LoHa and LoKr use it too; AdaLoRA starts at this rank "
        "and prunes."))
    lora_alpha: float = Field(32, gt=0, description=(
        "Scaling numerator (the update is scaled by lora_alpha / r), usually 2*r; LoHa and "
        "LoKr take it as their alpha."))
    lora_dropout: float = Field(0.05, ge=0, lt=1, description=(
        "Dropout on the adapter's input, in [0, 1); LoHa and LoKr take it as rank_dropout."))
    target_modules: str | list[str] = Field("all-linear", description=(
        "Layers that get adapters: all-linear (every linear layer but the output head) or a "
        "list of module names such as [q_proj, v_proj]. Every layer-adapting peft.method uses "
        "it (IA3 uses only this)."))
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")


PROMPT_LEARNING = ("prompt_tuning", "prefix_tuning", "p_tuning")
UNQUANTIZED_ONLY = ("loha", "lokr")  # PEFT implements them for plain nn.Linear layers only
# The methods train.fsdp shards (the ones its tests train under it).
SHARDED_METHODS = ("lora", "none")
# Full fine-tuning: no PEFT method, every weight trains, and train writes the whole model.
FULL_FINETUNE = "none"


class PeftMethodConfig(Section):
    # lora (QLoRA with quant.load_in_4bit), dora, adalora, loha, lokr and ia3 adapt the layers
    # in lora.target_modules (with lora.r / lora_alpha / lora_dropout where the method has
    # them) and can be merged into the base; prompt_tuning, prefix_tuning and p_tuning learn
    # virtual tokens in front of the input and leave the base untouched (not mergeable);
    # none trains every weight of the model itself (no adapter).
    method: Literal["lora", "dora", "adalora", "loha", "lokr", "ia3", *PROMPT_LEARNING, FULL_FINETUNE] = Field(
        "lora", description=(
            "The PEFT method; lora with quant.load_in_4bit is QLoRA; none: full fine-tuning. Layer methods (lora, dora, "
            "adalora, loha, lokr, ia3) adapt the layers in lora.target_modules and merge into the base; "
            "prompt_tuning, prefix_tuning and p_tuning learn virtual tokens in front of the "
            "input and leave the base untouched (not mergeable); none is full fine-tuning: every "
            "weight trains and train writes the whole model (no adapter, nothing to merge). loha, "
            "lokr and none need quant.load_in_4bit: false; prefix_tuning needs "
            "train.gradient_checkpointing: false."))
    num_virtual_tokens: int = Field(16, ge=1, description=(
        "Soft-prompt length in tokens (prompt_tuning, prefix_tuning and p_tuning only)."))
    adalora_target_r: int = Field(4, ge=1, description=(
        "adalora only: the average rank it prunes lora.r down to (below lora.r). AdaLoRA "
        "reallocates ranks after every optimizer step over train.max_steps, which must be "
        "positive."))

    @property
    def full_finetune(self) -> bool:
        """Whether every weight trains (method none): train's output is a whole model."""
        return self.method == FULL_FINETUNE
