"""Typed params: the only reader of params.yaml.

Every section is a pydantic model with `extra="forbid"`, so a typo fails at once naming the
key path. Field names are the argument names of the library each one feeds
(`LoraConfig(r=...)`, `TrainingArguments(learning_rate=...)`, `BitsAndBytesConfig(...)`),
so no renaming layer exists. `load_params` reports every problem together.

    finetune check --params params.yaml
"""

from __future__ import annotations

import difflib
import hashlib
import json
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, create_model,
                      field_validator, model_validator)

from tasks import templates
from tasks.errors import ConfigError, TemplateError

# Local inputs must live where dvc.yaml tracks them, or DVC could not notice they changed.
DATA_DIR = Path("data/raw")
MODELS_DIR = Path("models")
LM_EVAL_DIR = Path("data/lm_eval")  # local lm-evaluation-harness task YAMLs and their data
# Formats prepare reads; compressed JSONL is decompressed as it is read.
LOCAL_DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".csv", ".tsv", ".parquet")
SPLIT_NAMES = ("train", "validation", "test")


def data_suffix(path: str) -> str | None:
    """The format of a local data file (or glob), e.g. '.jsonl.gz'; None for a Hub id."""
    name = Path(path).name.lower()
    return next((s for s in sorted(LOCAL_DATA_SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


# A file, a glob, or a list of them: read as one split, files in sorted order.
Files = str | list[str]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitConfig(Section):
    seed: int = Field(42, description=(
        "Seed of the hash split: the same seed and the same ids give the same split, whatever "
        "the row order."))
    validation_size: float = Field(0.1, ge=0, lt=1, description=(
        "Share of rows for the validation split, in [0, 1); 0: no validation split. The "
        "validation loss is computed once after training (metrics/train.json)."))
    test_size: float = Field(0.1, gt=0, lt=1, description=(
        "Share of rows for the test split, in (0, 1): what evaluate, export and promote score."))
    source_splits: dict[Literal["train", "validation", "test"], str] | None = Field(None, description=(
        "Hub only: use the dataset's own splits, e.g. {train: train, validation: validation, "
        "test: test} (our split: the source's). The seed and sizes then no longer decide the "
        "split; map train and test, and validation too unless validation_size is 0. For local "
        "files, give data.path as split files instead."))

    @model_validator(mode="after")
    def _sizes(self) -> SplitConfig:
        if self.validation_size + self.test_size >= 1:
            raise ValueError("validation_size + test_size must be below 1 (nothing left to train on)")
        return self


class SplitFiles(Section):
    """A dataset shipped as split files. A missing validation or test split is carved out of
    train by the hash split, with data.split's sizes."""
    train: Files = Field(description=(
        "The train split: a file under data/raw/, a glob or a list of them (read in sorted "
        "order), in any format data.path takes."))
    validation: Files | None = Field(None, description=(
        "The validation split's files; null: carved out of train by the hash split "
        "(data.split.validation_size)."))
    test: Files | None = Field(None, description=(
        "The test split's files, e.g. the official test set every published number uses; null: "
        "carved out of train by the hash split (data.split.test_size)."))

    def given(self) -> dict[str, list[str]]:
        """The splits that have files, each as a list of files or globs."""
        out = {}
        for split in SPLIT_NAMES:
            value = getattr(self, split)
            if value is not None:
                out[split] = [value] if isinstance(value, str) else value
        return out


# Tags of a union's members start with this; messages leave them out of the key path, so a
# problem in split files reads `data.path.train`, with no report on the other shapes.
TAG = "as-"


def _path_shape(value: Any) -> str:
    shape = "split-files" if isinstance(value, dict | SplitFiles) else \
        "files" if isinstance(value, list) else "none" if value is None else "file"
    return TAG + shape


PathShapes = Annotated[SplitFiles, Tag(TAG + "split-files")] | Annotated[list[str], Tag(TAG + "files")] \
    | Annotated[str, Tag(TAG + "file")]
DataPath = Annotated[PathShapes, Discriminator(_path_shape)]
OptionalDataPath = Annotated[PathShapes | Annotated[None, Tag(TAG + "none")], Discriminator(_path_shape)]


class SourceConfig(Section):
    """One source of a mixture (data.sources); unset keys take data's and prompt's values."""
    path: DataPath = Field(description=(
        "This source's data, in any form data.path takes: a file, glob or list under data/raw/, "
        "split files, or a Hub dataset id (with revision)."))
    name: str | None = Field(None, description="This source's Hub dataset configuration (Hub only).")
    revision: str | None = Field(None, description=(
        "This source's Hub dataset tag or commit sha: required for a Hub source."))
    columns: dict[str, str] | None = Field(None, description=(
        "Template field to column name for this source; null: data.columns."))
    template: str | None = Field(None, description=(
        "This source's prompt template (a built-in name or a string with {field} "
        "placeholders); null: prompt.template."))
    completion: str | None = Field(None, description=(
        "This source's completion template, with a custom template; null: prompt.completion."))
    weight: float | None = Field(None, gt=0, description=(
        "This source's share of the mixture, relative to the other weighted sources; give a "
        "weight or a row_cap, not both (neither: all its rows). The mixture is the largest with "
        "these shares that repeats no row: 3:1 over 300 and 200 rows takes 300 and 100. It "
        "applies to the whole source, choosing rows by a hash of (split.seed, id), so a rerun "
        "keeps the same rows; each split gets its hash share of the rows kept."))
    row_cap: int | None = Field(None, ge=1, description=(
        "Take at most this many rows of this source (chosen by a hash of split.seed and the "
        "id); give a row_cap or a weight, not both."))
    label: str | None = Field(None, pattern=r"^[^/]+$", description=(
        "This source's name in metrics/prepare.json (rows_per_source) and in row ids "
        "(<label>/<id>, so sources may reuse ids); null: source0, source1, ... No '/' in it."))

    @model_validator(mode="after")
    def _one_limit(self) -> SourceConfig:
        if self.weight is not None and self.row_cap is not None:
            raise ValueError("give a source a weight or a row_cap, not both")
        return self


class DataConfig(Section):
    path: OptionalDataPath = Field(None, description=(
        "The data: a file under data/raw/, a glob or a list of them, {train, validation, test} "
        "split files, or a Hub dataset id; null with data.sources. Local formats: .jsonl (one "
        "JSON object per line; also gzip .jsonl.gz and zstd .jsonl.zst), .json (a list of "
        "objects), .csv/.tsv (header row) and .parquet. A glob (data/raw/part-*.jsonl) or a "
        "list is read as one source, files in sorted order. A split left out of split files is "
        "carved out of train by the hash split."))
    name: str | None = Field(None, description=(
        "Hub dataset configuration (datasets.load_dataset's name); Hub only."))
    revision: str | None = Field(None, description=(
        "Hub dataset tag or commit sha: required for Hub datasets. A branch such as main "
        "passes the check but moves on the Hub, and DVC sees only this string: pin a tag or a "
        "commit."))
    columns: dict[str, str] = Field({}, description=(
        "Template field to column name in your data, e.g. {dialogue: text}; unmapped fields "
        "use their own name."))
    id_column: str | None = Field("id", description=(
        "Column holding a unique row id, used for the split and the duplicate check; null: "
        "none. Rows are then named row0, row1, ... and split by a hash of their rendered "
        "content."))
    split: SplitConfig = Field(SplitConfig(), description=(
        "How rows are split into train, validation and test: by a hash of each row's id."))
    max_rows: int | None = Field(None, ge=1, description=(
        "Read only the first N rows of each source split, for quick trials; null: all. With "
        "source_splits, N counts across the splits in the order listed."))
    on_bad_record: Literal["error", "skip"] = Field("error", description=(
        "error: stop at the first bad record, naming its file and line; skip: drop it and count "
        "why in metrics/prepare.json. Bad records: malformed JSON, invalid UTF-8, a missing "
        "field or id, a duplicate id, a wrong type, an empty completion, an unknown label."))
    on_leakage: Literal["warn", "drop", "error"] = Field("warn", description=(
        "What prepare does with a validation/test row whose prompt repeats one of an earlier "
        "split: warn, drop or error. With warn it logs and counts them; drop removes them from "
        "validation/test (train is never touched); error stops, naming the rows. A repeat is "
        "exact, normalized (equal once case, whitespace and punctuation are ignored) or near "
        "(see leakage_threshold), under "
        "another id. Counts per kind and split go to metrics/prepare.json under leakage (and "
        "to the Prefect artifact data-leakage)."))
    leakage_threshold: float = Field(0.8, gt=0, le=1, description=(
        "Near-duplicate threshold: the Jaccard similarity of two prompts' word 3-grams at or "
        "above which a held-out row counts as leaked. Candidates come from MinHash LSH "
        "(datasketch, fixed seed: deterministic), their similarity is then computed exactly. "
        "At 0.8, changing one word in forty still counts."))
    allow_external_links: bool = Field(False, description=(
        "Follow symlinks under data/raw/ and models/ that point outside the repository (each "
        "one is logged). Off: such a link stops the stage, since DVC would version a file the "
        "repository does not hold."))
    delimiter: str | None = Field(None, min_length=1, max_length=1, description=(
        "The field separator of .csv/.tsv files, one character such as ';'; null: ',' for "
        ".csv, a tab for .tsv."))
    references: list[str] | None = Field(None, min_length=1, description=(
        "Columns holding a test row's reference texts, e.g. [summary1, summary2, summary3]; "
        "null: the completion. Each column holds a text or a list of texts, and evaluate scores "
        "a prediction against its best reference. With null, a completion field that holds a "
        "list of texts gives each item as a reference (the first is what training learns). "
        "Needs a text template whose completion has exactly one {field}."))
    sources: list[SourceConfig] | None = Field(None, min_length=1, description=(
        "A mixture of several sources instead of data.path (set path: null); null: the one "
        "source data.path names. Each source has its own path and optionally columns, "
        "template, label and a weight or row_cap; id_column, delimiter, references and split "
        "are shared by all of them."))

    @property
    def is_local(self) -> bool:
        return self.path is not None and (not isinstance(self.path, str) or data_suffix(self.path) is not None)

    def source(self, index: int) -> DataConfig:
        """data as source `index` of the mixture sees it (validated like data itself)."""
        src = (self.sources or [])[index]
        return DataConfig.model_validate({
            **self.model_dump(exclude={"sources"}), "path": src.model_dump()["path"], "name": src.name,
            "revision": src.revision, "columns": self.columns if src.columns is None else src.columns})

    def local_sources(self) -> list[tuple[str | None, list[str]]]:
        """(fixed split, or None for the hash split; files or globs) per local source."""
        assert self.path is not None, "a mixture's parts each have a path (DataConfig.source)"
        if isinstance(self.path, SplitFiles):
            return list(self.path.given().items())
        return [(None, [self.path] if isinstance(self.path, str) else self.path)]

    @property
    def hash_splits(self) -> set[str]:
        """The splits the hash split fills: all of them, or those no split file gives."""
        given = self.path.given() if isinstance(self.path, SplitFiles) else {}
        return {s for s in SPLIT_NAMES if s == "train" or s not in given}

    @model_validator(mode="after")
    def _source(self) -> DataConfig:
        if (self.path is None) == (self.sources is None):
            raise ValueError("give data.path (one source) or data.sources (a mixture), not both")
        if self.sources is not None:
            problems = []
            for i, src in enumerate(self.sources):
                try:
                    self.source(i)
                    if src.template is not None:
                        PromptConfig(template=src.template, completion=src.completion)
                except ValidationError as err:
                    problems += [f"sources.{i}: {p}" for p in describe(err)]
            labels = [s.label for s in self.sources if s.label is not None]
            if len(set(labels)) != len(labels):
                problems.append("sources: two sources have the same label")
            if problems:
                raise ValueError("\n".join(problems))
            return self
        if self.is_local:
            for split, files in self.local_sources():
                key = "path" if split is None else f"path.{split}"
                if not files:
                    raise ValueError(f"{key}: name at least one file")
                for f in files:
                    p = Path(f)
                    if data_suffix(f) is None:
                        raise ValueError(f"{key}: {f!r} is not a format prepare reads "
                                         f"({', '.join(LOCAL_DATA_SUFFIXES)})")
                    if p.is_absolute() or ".." in p.parts or p.parts[:2] != DATA_DIR.parts:
                        raise ValueError(f"{key}: local data must be under {DATA_DIR}/ (dvc.yaml "
                                         f"tracks that folder), got {f!r}")
            if self.split.source_splits:
                raise ValueError("split.source_splits needs a Hub dataset; for local files give "
                                 "path as {train: ..., validation: ..., test: ...}")
        elif self.revision is None:
            raise ValueError(f"{self.path!r} is read from the Hugging Face Hub: pin `revision` "
                             "(a tag or commit sha) so reruns read the same data")
        return self


class PromptConfig(Section):
    template: str = Field("dialogue_summary", description=(
        "A built-in template (dialogue_summary, instruction, question_answer, "
        "text_classification, chat) or your own string with {field} placeholders. "
        "Placeholders are plain field names only: no attributes, indexing, format specs or "
        "expressions, so a template cannot run code; write {{ and }} for literal braces."))
    completion: str | None = Field(None, description=(
        "Completion template, e.g. ' {answer}': required with a custom template, refused with "
        "a built-in."))

    @model_validator(mode="after")
    def _template(self) -> PromptConfig:
        if self.template in templates.TEMPLATE_NAMES:
            if self.completion is not None:
                raise ValueError(f"completion is fixed by the built-in template {self.template!r}; "
                                 "remove it or write a custom template")
            return self
        if "{" not in self.template:
            raise ValueError(f"template {self.template!r} is neither a built-in "
                             f"({', '.join(templates.TEMPLATE_NAMES)}) nor has {{field}} placeholders")
        if self.completion is None:
            raise ValueError("a custom template needs `completion` too (e.g. ' {answer}')")
        try:
            templates.parse(self.template)
            templates.parse(self.completion)
        except TemplateError as err:
            raise ValueError(str(err)) from None
        return self

    @property
    def fields(self) -> list[str]:
        if self.template == templates.CHAT:
            return ["messages"]
        tpl = templates.resolve(self.template, self.completion)
        alternatives = "".join(tpl.prompt_when_empty.values())
        return list(dict.fromkeys(templates.fields_of(tpl.prompt + alternatives + tpl.completion)))


def reference_field(prompt: PromptConfig) -> str | None:
    """The one field a text template's completion is made of (its reference text), if any."""
    if prompt.template == templates.CHAT:
        return None
    names = set(templates.fields_of(templates.resolve(prompt.template, prompt.completion).completion))
    return names.pop() if len(names) == 1 else None


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
    trust_remote_code: bool = Field(False, description=(
        "Run model code shipped with the checkpoint (config.json's auto_map): only if you have "
        "read it and trust it. A warning is logged when this is on."))
    allow_pickle_weights: bool = Field(False, description=(
        "Load pickle .bin/.pt weights, which can run code when loaded; false: safetensors only. "
        "Logged when on."))
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field("sdpa", description=(
        "Attention kernel; flash_attention_2 needs the flash-attn package, which is not a "
        "dependency."))

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


class PeftMethodConfig(Section):
    # lora (QLoRA with quant.load_in_4bit), dora, adalora, loha, lokr and ia3 adapt the layers
    # in lora.target_modules (with lora.r / lora_alpha / lora_dropout where the method has
    # them) and can be merged into the base; prompt_tuning, prefix_tuning and p_tuning learn
    # virtual tokens in front of the input and leave the base untouched (not mergeable).
    method: Literal["lora", "dora", "adalora", "loha", "lokr", "ia3", *PROMPT_LEARNING] = Field(
        "lora", description=(
            "The PEFT method; lora with quant.load_in_4bit is QLoRA. Layer methods (lora, dora, "
            "adalora, loha, lokr, ia3) adapt the layers in lora.target_modules and merge into the base; "
            "prompt_tuning, prefix_tuning and p_tuning learn virtual tokens in front of the "
            "input and leave the base untouched (not mergeable). loha and lokr need "
            "quant.load_in_4bit: false; prefix_tuning needs train.gradient_checkpointing: false."))
    num_virtual_tokens: int = Field(16, ge=1, description=(
        "Soft-prompt length in tokens (prompt_tuning, prefix_tuning and p_tuning only)."))
    adalora_target_r: int = Field(4, ge=1, description=(
        "adalora only: the average rank it prunes lora.r down to (below lora.r). AdaLoRA "
        "reallocates ranks after every optimizer step over train.max_steps, which must be "
        "positive."))


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
        "* num_processes."))
    num_processes: int = Field(1, ge=1, description=(
        "Data-parallel processes on this host: one per GPU (NCCL), or gloo processes on a "
        "CPU-only host. The train stage launches them itself (torch's elastic launcher, what "
        "torchrun is); each loads its own 4-bit copy of the base on its own GPU. Under an "
        "outside launcher (torchrun, accelerate launch) a different process count is refused, "
        "because the effective batch would not be what params.yaml says."))
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
        "machine they fall back to adamw_torch, with a logged warning."))
    gradient_checkpointing: bool = Field(True, description=(
        "Trade compute for activation memory (non-reentrant gradient checkpointing)."))
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
        "counts."))
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

    @model_validator(mode="after")
    def _length(self) -> TrainConfig:
        if self.max_steps == 0:
            raise ValueError("max_steps is 0: set a positive number of steps, or -1 to use "
                             "num_train_epochs")
        return self


class AlignConfig(Section):
    enabled: bool = Field(False, description=(
        "Run DPO (TRL) on preference pairs after SFT, starting from the SFT adapter; false: the "
        "stage only records that it is off. Needs peft.method lora and a template other than "
        "chat. When on, evaluate scores and export merges the aligned adapter."))
    path: str = Field("data/raw/preferences.jsonl", description=(
        "Preference records under data/raw/: the template's input fields (data.columns "
        "applies), chosen and rejected completions, and the id column. The id's split "
        "(data.split) decides which pairs are held out for the reported reward accuracy and "
        "margins."))
    beta: float = Field(0.1, gt=0, description=(
        "DPO's beta: how strongly the policy is held near the reference, the SFT model (the "
        "implicit KL penalty)."))
    max_steps: int = Field(30, ge=1, description="DPO optimizer steps.")
    per_device_train_batch_size: int = Field(4, ge=1, description=(
        "Preference pairs per batch in each process."))
    per_device_eval_batch_size: int = Field(8, ge=1, description=(
        "Batch for the held-out reward metrics."))
    learning_rate: float = Field(5e-4, gt=0, description=(
        "DPO's peak learning rate; the shipped 5e-4 is high for the random smoke model (about "
        "5e-6 to 5e-5 for real models)."))
    seed: int = Field(0, description="Seeds DPO's data order and dropout.")

    @model_validator(mode="after")
    def _local(self) -> AlignConfig:
        if not Path(self.path).as_posix().startswith("data/raw/"):
            raise ValueError(f"path: {self.path} must be under data/raw/ (the folder dvc.yaml tracks)")
        return self


class EvaluateConfig(Section):
    # Generation settings, shared with export's re-scoring:
    max_new_tokens: int = Field(48, ge=1, description=(
        "Generation length in tokens (generative tasks), also used by export. For causal_lm it "
        "must be below tokenize.max_length: prompt and answer share the sequence."))
    per_device_eval_batch_size: int = Field(16, ge=1, description=(
        "Generation batch, also used by export and finetune predict."))
    max_samples: int | None = Field(None, ge=1, description=(
        "Score only the first N test rows; null: all. Also used by export."))
    # Scoring settings, read by evaluate only:
    use_stemmer: bool = Field(True, description=(
        "ROUGE with Porter stemming, as rouge_score and most papers do."))
    bootstrap_samples: int = Field(1000, ge=10, description=(
        "Resamples for the percentile-bootstrap confidence intervals (at least 10); promote "
        "uses them too."))
    confidence_level: float = Field(0.95, gt=0, lt=1, description=(
        "Confidence level of the bootstrap intervals, in (0, 1)."))
    seed: int = Field(0, description="Bootstrap seed: the same inputs give the same intervals.")
    preview_rows: int = Field(5, ge=0, description=(
        "Predictions shown in reports/eval_preview.md."))
    # The general-capability check, read by evaluate only (off while lm_eval_tasks is []):
    lm_eval_tasks: list[str] = Field([], description=(
        "EleutherAI lm-evaluation-harness tasks run on the base and on the tuned model (adapter "
        "attached) to catch forgetting (metrics/lm_eval.json; promote.max_regression gates on "
        "it): harness task or group names (e.g. hellaswag, arc_easy: their data comes from the "
        "Hugging Face Hub) or paths of task YAMLs under data/lm_eval/ (local data, offline). "
        "[]: off."))
    lm_eval_limit: int | None = Field(None, ge=1, description=(
        "Score only the first N items of each harness task (the harness's `limit`); null: all."))
    lm_eval_num_fewshot: int | None = Field(None, ge=0, description=(
        "Few-shot examples in each harness prompt (the harness's `num_fewshot`); null: each "
        "task's own default (0 where it sets none)."))

    @field_validator("lm_eval_tasks")
    @classmethod
    def _lm_eval_tasks(cls, specs: list[str]) -> list[str]:
        problems = []
        for spec in specs:
            if not spec.endswith((".yaml", ".yml")):
                continue  # a harness task name, checked by the harness when evaluate runs
            p = Path(spec)
            if p.is_absolute() or ".." in p.parts or p.parts[:2] != LM_EVAL_DIR.parts:
                problems.append(f"{spec!r}: a task YAML must be under {LM_EVAL_DIR}/ (dvc.yaml "
                                "tracks that folder)")
        if len(set(specs)) != len(specs):
            problems.append("a task is listed twice")
        if problems:
            raise ValueError("\n".join(problems))
        return specs


class ExportConfig(Section):
    torch_dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description=(
        "Dtype of the merged model; float16 and bfloat16 take half the disk and memory of "
        "float32 but round the merged weights."))
    merge_into: Literal["dequantized", "original"] = Field("dequantized", description=(
        "Which weights the adapter is merged into: dequantized (the 4-bit weights it was "
        "trained against) or original (the full-precision checkpoint). With dequantized, those "
        "4-bit weights are cast up to torch_dtype, so the merged model reproduces the tuned one "
        "that evaluate scored; original reloads the full-precision checkpoint and merges there "
        "(what most tutorials do; drifts a little). The merge never happens in 4-bit, and both "
        "export checks (logits, metric) must pass before anything is written."))
    check_prompts: int = Field(4, ge=1, description=(
        "Test prompts whose logits are compared, merged model against base + adapter. The "
        "logits are the next token's after the prompt (causal_lm), the decoder's first token's "
        "(seq2seq) or the classes' (classification)."))
    logits_atol: float = Field(1e-3, gt=0, description=(
        "Largest allowed absolute logit difference, merged model against base + adapter."))
    metric_atol: float = Field(0.02, ge=0, description=(
        "Largest allowed |merged - adapter| of the headline metric (ROUGE-L; accuracy for "
        "classification) on the scored test rows; also bounds |GGUF - merged|."))
    gguf: Literal["f32", "f16", "bf16", "q8_0"] | None = Field(None, description=(
        "Also write artifacts/merged/model-<type>.gguf in this tensor type; null: no GGUF. It "
        "goes through llama.cpp's own converter (make gguf-converter), is loaded back with "
        "transformers and re-scored on the test split (metric_atol applies). causal_lm and "
        "merging methods only."))


class PromoteConfig(Section):
    min_gain: float = Field(0.0, description=(
        "Promote the exported model (registry/latest.json) only when it beats the champion by "
        "at least this on the headline metric, on the same test rows. The champion is the model "
        "registry/latest.json points at (the base before anything was promoted), so from the "
        "second run on the margin is over the last promoted model; the headline metric is "
        "ROUGE-L for causal_lm and seq2seq, accuracy for sequence_classification."))
    max_regression: float | None = Field(None, ge=0, description=(
        "Refuse promotion when any task of evaluate.lm_eval_tasks drops by more than this from "
        "the base to the tuned model, in the task's main metric (its first; e.g. acc, 0-1); "
        "null: the scores are reported, not checked."))


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
        "Optional preference tuning (DPO) after SFT."))
    evaluate: EvaluateConfig = Field(EvaluateConfig(), description=(
        "Generation and scoring on the test split, base against tuned."))
    export: ExportConfig = Field(ExportConfig(), description=(
        "The merge, its checks and the standalone model (and GGUF)."))
    promote: PromoteConfig = Field(PromoteConfig(), description=(
        "The release rule: promote the exported model only when it beats the champion."))

    @model_validator(mode="after")
    def _cross(self) -> Params:
        problems = []
        task = self.model.task
        if task == "causal_lm" and self.evaluate.max_new_tokens >= self.tokenize.max_length:
            problems.append(f"evaluate.max_new_tokens ({self.evaluate.max_new_tokens}) must be below "
                            f"tokenize.max_length ({self.tokenize.max_length}) to leave room for the prompt")
        if self.export.merge_into == "dequantized" and not self.quant.load_in_4bit:
            problems.append("export.merge_into 'dequantized' needs quant.load_in_4bit: true "
                            "(with an unquantized base, use 'original')")
        method = self.peft.method
        if method in UNQUANTIZED_ONLY and self.quant.load_in_4bit:
            problems.append(f"peft.method {method} has no 4-bit (bitsandbytes) implementation in "
                            "PEFT: set quant.load_in_4bit: false (and export.merge_into: original)")
        if method in PROMPT_LEARNING and self.train.padding_free is True:
            problems.append(f"peft.method {method} puts virtual tokens in front of each sequence, "
                            "which packing would share between examples: set train.padding_free: false")
        if method == "prefix_tuning" and self.train.gradient_checkpointing:
            problems.append("peft.method prefix_tuning feeds its prefixes as a KV cache, which PEFT "
                            "cannot combine with gradient checkpointing: set "
                            "train.gradient_checkpointing: false")
        if self.align.enabled and (self.prompt.template == "chat" or method != "lora"):
            problems.append("align.enabled needs prompt.template other than chat and peft.method "
                            "lora (the DPO stage supports those so far)")
        if task != "causal_lm":
            if self.train.padding_free is True:
                problems.append(f"train.padding_free packs examples for causal LMs only (model.task is "
                                f"{task}): set it to auto or false")
            if self.prompt.template == templates.CHAT:
                problems.append(f"prompt.template chat renders a causal LM's chat template; model.task "
                                f"{task} needs a text template")
            if self.align.enabled:
                problems.append(f"align.enabled needs model.task causal_lm (DPO scores completions "
                                f"of a causal LM; task is {task})")
        if self.data.references and (task == "sequence_classification"
                                     or reference_field(self.prompt) is None):
            problems.append("data.references needs a generative model.task and a text template whose "
                            "completion has exactly one {field} (each reference fills it)")
        if self.export.gguf and (task != "causal_lm" or method in PROMPT_LEARNING):
            problems.append("export.gguf needs model.task causal_lm and a peft.method that merges "
                            "(GGUF holds one standalone decoder model)")
        # seq2seq is the harness's other backend, but untested here with an adapter attached.
        if self.evaluate.lm_eval_tasks and (task != "causal_lm" or method in PROMPT_LEARNING):
            problems.append("evaluate.lm_eval_tasks scores a causal LM's log-likelihoods: it needs "
                            "model.task causal_lm and a peft.method that keeps the input as it is "
                            f"(not {', '.join(PROMPT_LEARNING)}; task is {task}, method {method})")
        if self.promote.max_regression is not None and not self.evaluate.lm_eval_tasks:
            problems.append("promote.max_regression checks the tasks of evaluate.lm_eval_tasks, which is "
                            "empty: list tasks there, or set max_regression to null")
        if method == "adalora" and self.train.max_steps < 1:
            problems.append("peft.method adalora schedules its rank budget over train.max_steps: "
                            "set a positive train.max_steps")
        if method == "adalora" and self.peft.adalora_target_r >= self.lora.r:
            problems.append(f"peft.adalora_target_r ({self.peft.adalora_target_r}) must be below "
                            f"lora.r ({self.lora.r}), the rank AdaLoRA starts from and prunes")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def digest(self, sections: tuple[str, ...] | None = None) -> str:
        """sha256 of the params (or of the named sections), independent of key order."""
        dump = self.model_dump(mode="json", include=set(sections) if sections else None)
        return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()


# Shows a wrong value without its whole content: a YAML alias bomb expands to billions of items.
SHORT = reprlib.Repr()
SHORT.maxlevel, SHORT.maxlist, SHORT.maxdict, SHORT.maxstring = 2, 4, 4, 80


def _key_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _allowed(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names allowed at `loc`'s parent, for suggesting a fix to an unknown key."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def describe(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith(("function-", TAG))))
        key = _key_path(loc)
        if e["type"] == "extra_forbidden" and "token" in str(loc[-1]).lower():
            problems.append(f"{key}: tokens never go in params (they would land in dvc.lock, git "
                            "and the model's manifest); set HF_TOKEN in the environment instead")
        elif e["type"] == "extra_forbidden":
            allowed = _allowed(Params, loc)
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{key}: unknown key{hint}; allowed here: {', '.join(allowed)}")
        elif e["type"] == "value_error":
            for line in str(e["ctx"]["error"]).splitlines():
                problems.append(f"{key}: {line}" if loc else line)
        else:
            got = "" if e["type"] == "missing" else f" (got {SHORT.repr(e['input'])})"
            problems.append(f"{key}: {e['msg']}{got}")
    return problems


def parse_params(raw: Any, source: str) -> Params:
    if not isinstance(raw, dict):
        raise ConfigError(source, ["the file must be a mapping of sections (data, prompt, model, ...)"])
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(source, describe(err)) from None


def read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(str(path), ["file not found"])
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(str(path), [f"{where}not valid YAML ({getattr(err, 'problem', err)})"]) from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), ["not UTF-8 text"]) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    return parse_params(read_yaml(path), str(path))


def _partial(model: type[BaseModel]) -> type[BaseModel]:
    """The same model with every field optional: the shape of an override."""
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            ann = _partial(ann)
        fields[name] = (ann | None, Field(None, description=info.description))
    return create_model(f"{model.__name__}Override", __config__=ConfigDict(extra="forbid"), **fields)


# Overrides of params.yaml values (the Prefect flow's parameter form): any subset of the keys,
# checked by the full Params model once merged into params.yaml.
ParamsOverride = _partial(Params)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with `over` merged in, section by section."""
    out = dict(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def apply_overrides(path: Path, overrides: BaseModel | dict[str, Any]) -> dict[str, Any]:
    """Validate `overrides` merged into the params file and write them into it, keeping its
    comments (as `dvc exp run -S` does). Returns the changed keys; writes nothing if invalid."""
    from ruamel.yaml import YAML

    over = overrides.model_dump(exclude_unset=True) if isinstance(overrides, BaseModel) else overrides
    parse_params(deep_merge(read_yaml(path) or {}, over), str(path))
    changed = _flatten(over)
    if not changed:
        return changed
    yml = YAML()
    doc = yml.load(path.read_text(encoding="utf-8"))
    for dotted, value in changed.items():
        node = doc
        *parents, leaf = dotted.split(".")
        for key in parents:
            if node.get(key) is None:
                node[key] = {}
            node = node[key]
        node[leaf] = value
    with path.open("w", encoding="utf-8") as f:
        yml.dump(doc, f)
    return changed
