"""The root model: params.yaml as a whole, one section per concern, checked across sections."""

from __future__ import annotations

import hashlib
import json

from pydantic import Field, model_validator

from tasks.config.base import Section
from tasks.config.data import DataConfig, PromptConfig
from tasks.config.evaluation import EvaluateConfig, ExportConfig, PromoteConfig
from tasks.config.model import LoraConfig, ModelConfig, PeftMethodConfig, QuantConfig
from tasks.config.rules import RULES
from tasks.config.training import AlignConfig, TokenizeConfig, TrainConfig


class Params(Section):
    """The pipeline's parameters (params.yaml): one section per concern."""
    data: DataConfig = Field(description="The dataset, its split and checks (prepare).")
    prompt: PromptConfig = Field(PromptConfig(), description=(
        "How a record becomes a prompt and a completion."))
    model: ModelConfig = Field(ModelConfig(), description="The base model and the task.")
    quant: QuantConfig = Field(QuantConfig(), description=(
        "4-bit quantization of the base (bitsandbytes): QLoRA."))
    lora: LoraConfig = Field(LoraConfig(), description=(
        "LoRA hyperparameters, also used by the LoRA-family methods of peft.method."))
    peft: PeftMethodConfig = Field(PeftMethodConfig(), description="Which PEFT method trains.")
    tokenize: TokenizeConfig = Field(TokenizeConfig(), description=(
        "Tokenization, loss masking and truncation."))
    train: TrainConfig = Field(TrainConfig(), description=(
        "Supervised fine-tuning with the transformers Trainer."))
    align: AlignConfig = Field(AlignConfig(), description=(
        "Optional preference tuning after SFT: DPO, KTO, ORPO or GRPO (align.method)."))
    evaluate: EvaluateConfig = Field(EvaluateConfig(), description=(
        "Generation and scoring on the test split, base against tuned."))
    export: ExportConfig = Field(ExportConfig(), description=(
        "The merge, its checks and the standalone model (and GGUF)."))
    promote: PromoteConfig = Field(PromoteConfig(), description=(
        "The release rule: promote the exported model only when it beats the champion."))

    @model_validator(mode="after")
    def _cross(self) -> Params:
        # Every rule runs, so one `finetune check` lists all the problems, not the first.
        problems = [problem for rule in RULES for problem in rule(self)]
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def digest(self, sections: tuple[str, ...] | None = None) -> str:
        """sha256 of the params (or of the named sections), independent of key order."""
        dump = self.model_dump(mode="json", include=set(sections) if sections else None)
        return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()
