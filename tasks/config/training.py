"""How the model trains: tokenize.*, train.* (SFT) and align.* (DPO, KTO or ORPO)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tasks.config.base import Section
from tasks.config.data import local_data_problem


class TokenizeConfig(Section):
    max_length: int = Field(512, ge=8, description=(
        "Tokens per example (at least 8): prompt + completion + EOS for causal_lm (a chat: the "
        "whole conversation). For seq2seq "
        "it limits the encoder input and the labels each; for classification, the input."))
    completion_only_loss: bool = Field(True, description=(
        "Loss on the completion only (prompt tokens get label -100; a chat: on its assistant "
        "turns); false: on every token."))
    truncation_side: Literal["left", "right"] = Field("left", description=(
        "Which end of a too-long example to cut: left keeps the end of the prompt and the "
        "completion; right cuts the end of the sequence. With left, tokens go from the start of "
        "the prompt, keeping a leading BOS, its cue (such as Summary:) and the whole completion, "
        "which is cut from its end only if it does not fit on its own. With right, the "
        "completion goes first (EOS included), then the end of the prompt, which can leave "
        "nothing to train on (an error). At generation time evaluate and export always cut "
        "long prompts from the left, to max_length - max_new_tokens tokens, keeping BOS."))
    overlong: Literal["truncate", "drop"] = Field("truncate", description=(
        "What to do with rows over max_length: truncate or drop them, counted in "
        "metrics/tokenize.json either way."))
    preview_rows: int = Field(3, ge=0, description=(
        "Train rows written to reports/label_preview.txt with the trained span marked, to check "
        "what the loss is on."))


# train.report_to's trackers and the package each needs (checked when train starts).
TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "dvclive": "dvclive"}


class TrainConfig(Section):
    seed: int = Field(42, description=(
        "Seeds initialisation, dropout and data order: the same seed gives the same adapter."))
    max_steps: int = Field(150, ge=-1, description=(
        "Optimizer steps; -1: train for num_train_epochs instead (0 is refused)."))
    num_train_epochs: float = Field(1.0, gt=0, description=(
        "Passes over the train split, used only when max_steps is -1."))
    per_device_train_batch_size: int = Field(8, ge=1, description=(
        "Examples per batch in each process."))
    gradient_accumulation_steps: int = Field(1, ge=1, description=(
        "Batches per optimizer step: the effective batch is per_device_train_batch_size * this "
        "* num_processes * num_nodes."))
    num_processes: int = Field(1, ge=1, description=(
        "Data-parallel processes on this host: one per GPU (NCCL), or gloo processes on a "
        "CPU-only host. The train stage launches them itself (torch's elastic launcher, what "
        "torchrun is); each loads its own 4-bit copy of the base on its own GPU. Under an "
        "outside launcher (torchrun, accelerate launch) a different process count is refused, "
        "because the effective batch would not be what params.yaml says."))
    num_nodes: int = Field(1, ge=1, description=(
        "Hosts that train together, each running num_processes processes: start `finetune "
        "train` (or dvc repro, or the SLURM/Kubernetes templates in deploy/) on every node with "
        "the same FINETUNE_RDZV_ENDPOINT (host:port of the node that hosts the rendezvous) and "
        "FINETUNE_RDZV_ID; they share the workspace (a shared filesystem) and the first process "
        "writes the adapter and metrics, or with FINETUNE_NODE_STORAGE=local each node works in "
        "its own checkout and writes them there. A node that never joins fails the stage after "
        "FINETUNE_RDZV_TIMEOUT seconds (600) with the count of nodes missing. The Prefect flow's "
        "split run (gpu_deployment) starts the nodes itself: one run per node on the GPU pool, "
        "each in its worker's own checkout, meeting at the flow run's rendezvous."))
    fsdp: bool = Field(False, description=(
        "Shard the model across the training processes (FSDP2, torch's fully_shard, through "
        "the Trainer): each of the num_processes * num_nodes processes holds its share of the "
        "weights, gradients and optimizer state, and a transformer block's full weights only "
        "while it computes, so a model too big for one device trains on several; the memory "
        "estimate counts the share. The first process gathers the whole adapter (or model) and "
        "writes it as without sharding; checkpoints are each process's shard. Needs 2 or more "
        "processes, quant.load_in_4bit: false and peft.method lora or none (full fine-tuning). "
        "Runs on GPUs (NCCL) and on a CPU (gloo); false: every process holds the whole model "
        "(data parallel)."))
    learning_rate: float = Field(3e-3, gt=0, description=(
        "Peak learning rate; the shipped 3e-3 is high because the smoke model starts from "
        "random weights (about 2e-4 for real models)."))
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup",
                               "cosine_with_restarts"] = Field("cosine", description=(
                                   "Learning-rate schedule after the warmup."))
    warmup_steps: float = Field(0.05, ge=0, description=(
        "Warmup: below 1, a fraction of the total steps; otherwise a number of steps."))
    weight_decay: float = Field(0.0, ge=0, description="The optimizer's weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description=(
        "Gradient clipping: the largest gradient norm."))
    optim: str = Field("paged_adamw_8bit", description=(
        "Any TrainingArguments optimizer name; paged and 8-bit ones need CUDA. On a CPU-only "
        "machine they fall back to adamw_torch_fused, with a logged warning; with "
        "model.cpu_math: portable, adamw_torch runs fused too (its unfused square roots differ "
        "between CPUs)."))
    gradient_checkpointing: Literal["auto"] | bool = Field("auto", description=(
        "Trade compute for activation memory (non-reentrant gradient checkpointing); auto: on "
        "only when training without it would need more than half of the free memory (the "
        "GPU's, or the host's on a CPU), by the memory estimate train logs."))
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description=(
        "Training precision; auto picks bf16 on GPUs that support it, else fp16 on CUDA, else "
        "fp32 (CPU)."))
    train_sampling_strategy: Literal["random", "group_by_length"] = Field("random", description=(
        "Batch order; group_by_length batches rows of similar length together (less padding "
        "per batch)."))
    padding_free: Literal["auto"] | bool = Field("auto", description=(
        "Pack each batch into one row with no padding; auto: on with flash_attention_2 only; "
        "false: pad each batch to its longest row. Examples sit end to end with position ids "
        "restarting at each, so no padding is computed. The attention mask derived from the "
        "position ids keeps examples apart: before the first step, train runs a few rows "
        "packed and one by one and "
        "refuses (naming this key) if the logits differ, as they do for architectures that "
        "ignore position ids in their mask (OPT, Bloom). The loss is that of padded batches (a "
        "test holds them within 1%; measured 1e-4 apart). flash_attention_2's varlen kernels "
        "attend within each example; with sdpa or eager the packed row gets a dense "
        "block-diagonal mask over its whole length, which costs more attention than the "
        "padding saves (0.87x on the CPU benchmark, BENCHMARKS.md)."))
    torch_compile: bool = Field(False, description=(
        "Compile the model with torch.compile (slower first steps; for long GPU runs)."))
    use_liger_kernel: bool = Field(False, description=(
        "Liger's fused kernels; needs the liger-kernel package (CUDA), refused with a message "
        "if it is missing."))
    tf32: Literal["auto"] | bool = Field("auto", description=(
        "TF32 matmuls; auto: on for GPUs that have TF32 (Ampere and newer); true on a machine "
        "without one is refused."))
    logging_steps: int = Field(1, ge=1, description=(
        "Log the loss, learning rate and tokens seen every N steps (a row of "
        "metrics/train_log.tsv, and the trackers of report_to)."))
    save_steps: int = Field(50, ge=1, description=(
        "Checkpoint every N steps into artifacts/checkpoints/; rerunning after a crash resumes "
        "from the last one."))
    save_total_limit: int = Field(2, ge=1, description=(
        "Checkpoints kept; save_total_limit + 1 exist at the peak, which the disk preflight "
        "counts. With eval_steps the best checkpoint is kept as well."))
    eval_steps: int | None = Field(None, ge=1, description=(
        "Validation loss every N steps, and the adapter is the best evaluated checkpoint's; "
        "null: the validation loss once, after the last step, and the last step's adapter. "
        "Each evaluation is an eval_loss in metrics/train_log.tsv, the trackers of report_to and "
        "the progress file; metrics/train.json records best_step and best_metric. save_steps "
        "must be a multiple of it."))
    metric_for_best_model: Literal["eval_loss", "loss"] = Field("eval_loss", description=(
        "The validation metric that picks the best checkpoint and drives early stopping (with "
        "eval_steps); lower is better for a loss (loss names the same metric)."))
    early_stopping_patience: int | None = Field(None, ge=1, description=(
        "Stop once metric_for_best_model has not improved for this many evaluations in a row; "
        "null: train for max_steps. Needs eval_steps (transformers' EarlyStoppingCallback); the "
        "adapter is the best checkpoint's and metrics/train.json says stopped_early."))
    early_stopping_threshold: float = Field(0.0, ge=0, description=(
        "How much an evaluation must beat the best so far to reset the patience count "
        "(absolute, in the metric's units)."))
    report_to: list[str] = Field([], json_schema_extra={"items": {"enum": list(TRACKERS)}}, description=(
        "Experiment trackers that get the run's params and loss curve; []: none (offline). A "
        "list such as [tensorboard, mlflow], used by train and align. They log through transformers' own "
        "integrations and write locally: tensorboard and dvclive under logs/, mlflow to "
        "MLFLOW_TRACKING_URI (default: mlruns/ in the repository); wandb follows its WANDB_* "
        "variables (WANDB_MODE=offline keeps it local). A listed tracker whose package is not "
        "installed stops train, naming the package."))

    @field_validator("report_to")
    @classmethod
    def _trackers(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in TRACKERS]
        if unknown:
            raise ValueError(f"unknown tracker {unknown[0]!r}; allowed values: {', '.join(TRACKERS)} "
                             "(a list, e.g. [tensorboard]; [] for none)")
        return list(dict.fromkeys(names))  # a tracker listed twice would log every step twice

    @property
    def world_size(self) -> int:
        """Training processes on all nodes together (torch's WORLD_SIZE)."""
        return self.num_processes * self.num_nodes

    @model_validator(mode="after")
    def _length(self) -> TrainConfig:
        if self.max_steps == 0:
            raise ValueError("max_steps is 0: set a positive number of steps, or -1 to use "
                             "num_train_epochs")
        return self


# align.method's choices, each a TRL trainer (the name is the method's own, lower case).
ALIGN_METHODS = ("dpo", "kto", "orpo", "grpo")
# GRPO's built-in rewards (tasks/rewards.py) and `function`, a user's own.
REWARDS = ("rouge", "exact_match", "regex", "length", "function")
# A user reward: a dotted module path inside the repository and a function name in it.
FUNCTION_SPEC = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


class RewardConfig(Section):
    name: Literal[REWARDS] = Field(description=(
        "rouge: ROUGE-L F against the best reference; exact_match: 1 if the answer equals a "
        "reference (whitespace and case aside), else 0; regex: 1 if the answer matches pattern; "
        "length: 1 at target words, falling linearly to 0 at 0 or twice target; function: a "
        "function of yours."))
    weight: float = Field(1.0, description="Weight of this reward in the sum GRPO optimizes.")
    pattern: str | None = Field(None, description=(
        "regex only: a Python regular expression searched for in the answer (anchor it with ^ "
        "and $ to match the whole answer)."))
    target: int | None = Field(None, ge=1, description="length only: the answer's ideal length in words.")
    function: str | None = Field(None, description=(
        "function only: module:function, the module a .py file inside the repository named by "
        "its dotted path (rewards.mine:brevity is rewards/mine.py), outside models/ and data/. "
        "It is called as function(completions=..., references=..., prompts=...) with lists of "
        "equal length (references: each answer's list of reference texts) and returns a list "
        "of floats."))

    @model_validator(mode="after")
    def _its_fields(self) -> RewardConfig:
        needs = {"regex": "pattern", "length": "target", "function": "function"}
        for name, field in needs.items():
            given = getattr(self, field) is not None
            if given != (self.name == name):
                raise ValueError(f"{field} is for name: {name} only, and needed there"
                                 f" (this reward is {self.name})")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as err:
                raise ValueError(f"pattern {self.pattern!r} is not a regular expression: {err}") from None
        if self.function is not None and not FUNCTION_SPEC.fullmatch(self.function):
            raise ValueError(f"function {self.function!r} must read module:function, the module a "
                             "dotted path inside the repository (e.g. rewards.mine:brevity)")
        return self


class AlignConfig(Section):
    enabled: bool = Field(False, description=(
        "Run preference tuning (align.method, with TRL) after SFT, starting from the SFT adapter; "
        "false: the stage only records that it is off. Needs peft.method lora and a template "
        "other than chat. When on, evaluate scores and export merges the aligned adapter."))
    method: Literal[ALIGN_METHODS] = Field("dpo", description=(
        "dpo: pairs, against the SFT model as reference; kto: desirable or undesirable "
        "completions (unpaired, or pairs split in two), against the SFT model; orpo: pairs, "
        "no reference model (an odds-ratio penalty on top of the chosen completion's loss); "
        "grpo: samples num_generations answers to each prompt of data/prepared/ and learns from "
        "their align.rewards, against the SFT model."))
    path: str = Field("data/raw/preferences.jsonl", description=(
        "Preference records under data/raw/: the template's input fields (data.columns "
        "applies), the id column, and chosen and rejected completions; for kto also (or instead) "
        "rows with a completion and a boolean label. The id's split (data.split) decides which "
        "records are held out for the reported metrics."))
    beta: float = Field(0.1, gt=0, description=(
        "dpo, kto and grpo: how strongly the policy is held near the reference, the SFT model "
        "(the KL penalty); orpo: the weight of the odds-ratio term against the chosen completion's "
        "loss (the paper's lambda)."))
    desirable_weight: float = Field(1.0, gt=0, description=(
        "kto only: weight of the desirable (label true) rows' loss; raise it when they are "
        "fewer than the undesirable ones."))
    undesirable_weight: float = Field(1.0, gt=0, description=(
        "kto only: weight of the undesirable (label false) rows' loss."))
    num_generations: int = Field(4, ge=2, description=(
        "grpo only: answers sampled per prompt, the group whose rewards are compared with one "
        "another (the group size)."))
    max_completion_length: int = Field(48, ge=1, description=(
        "grpo only: the longest sampled answer, in tokens; also the greedy answers scored on "
        "held-out prompts."))
    rewards: list[RewardConfig] = Field([RewardConfig(name="rouge")], min_length=1, description=(
        "grpo only: the rewards summed, each with its weight, e.g. [{name: exact_match}, {name: "
        "length, target: 20, weight: 0.2}]; references are the prepared completions (or "
        "data.references)."))
    max_steps: int = Field(30, ge=1, description="Optimizer steps.")
    per_device_train_batch_size: int = Field(4, ge=1, description=(
        "Examples per batch in each process: pairs for dpo and orpo, rows for kto (a pair is "
        "two rows there), sampled answers for grpo (a multiple of num_generations). kto needs at least 2: it estimates its KL term by pairing each prompt "
        "with another row's completion in the same batch."))
    per_device_eval_batch_size: int = Field(8, ge=1, description=(
        "Batch for the held-out metrics."))
    learning_rate: float = Field(5e-4, gt=0, description=(
        "Peak learning rate; the shipped 5e-4 is high for the random smoke model (about "
        "5e-6 to 5e-5 for real models)."))
    seed: int = Field(0, description="Seeds the data order and dropout.")

    @model_validator(mode="after")
    def _local(self) -> AlignConfig:
        # Read as data.path's local files are: only from data/raw/, and never a folder.
        if (problem := local_data_problem(self.path)) is not None:
            raise ValueError(f"path: {problem}")
        return self

