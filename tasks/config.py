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
    seed: int = 42
    validation_size: float = Field(0.1, ge=0, lt=1)
    test_size: float = Field(0.1, gt=0, lt=1)
    # Use the source's own splits (e.g. {train: train, validation: validation, test: test}).
    source_splits: dict[Literal["train", "validation", "test"], str] | None = None

    @model_validator(mode="after")
    def _sizes(self) -> SplitConfig:
        if self.validation_size + self.test_size >= 1:
            raise ValueError("validation_size + test_size must be below 1 (nothing left to train on)")
        return self


class SplitFiles(Section):
    """A dataset shipped as split files. A missing validation or test split is carved out of
    train by the hash split, with data.split's sizes."""
    train: Files
    validation: Files | None = None
    test: Files | None = None

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
    path: DataPath
    name: str | None = None
    revision: str | None = None
    columns: dict[str, str] | None = None
    template: str | None = None  # this source's prompt.template (and completion)
    completion: str | None = None
    # A share of the mixture relative to the other weighted sources (the largest mixture with
    # these shares that repeats no row), or a cap on the rows taken; neither: all its rows.
    # Both apply to the whole source; each split gets its hash share of the rows kept.
    weight: float | None = Field(None, gt=0)
    row_cap: int | None = Field(None, ge=1)
    # Its name in metrics/prepare.json and in row ids (<label>/<id>); null: source<N>.
    label: str | None = Field(None, pattern=r"^[^/]+$")

    @model_validator(mode="after")
    def _one_limit(self) -> SourceConfig:
        if self.weight is not None and self.row_cap is not None:
            raise ValueError("give a source a weight or a row_cap, not both")
        return self


class DataConfig(Section):
    # A local file under data/raw/ (.jsonl, .jsonl.gz, .jsonl.zst, .json, .csv, .tsv,
    # .parquet), a glob or list of them, or {train, validation, test} split files; else a Hub id.
    path: OptionalDataPath = None  # null with data.sources
    name: str | None = None  # Hub dataset configuration (datasets.load_dataset's `name`)
    revision: str | None = None  # Hub dataset revision; required for Hub datasets
    columns: dict[str, str] = {}  # template field -> column name in the source
    id_column: str | None = "id"
    split: SplitConfig = SplitConfig()
    max_rows: int | None = Field(None, ge=1)
    on_bad_record: Literal["error", "skip"] = "error"
    on_leakage: Literal["warn", "drop", "error"] = Field("warn", description=(
        "What prepare does with a validation/test row whose prompt repeats one of an earlier "
        "split (exactly, after normalizing case/whitespace/punctuation, or nearly: see "
        "leakage_threshold): warn (log and count), drop (remove it from validation/test; "
        "train is never touched) or error (stop, naming the rows)."))
    leakage_threshold: float = Field(0.8, gt=0, le=1, description=(
        "Near-duplicate threshold: the Jaccard similarity of two prompts' word 3-grams "
        "(MinHash LSH candidates, exact similarity) at or above which a held-out row counts "
        "as leaked."))
    allow_external_links: bool = Field(False, description=(
        "Follow symlinks under data/raw/ and models/ that point outside the repository (each "
        "one is logged). Off: such a link stops the stage, since DVC would version a file the "
        "repository does not hold."))

    # The field separator of .csv/.tsv files; null: ',' for .csv, a tab for .tsv.
    delimiter: str | None = Field(None, min_length=1, max_length=1)
    # Columns holding a test row's reference texts (each text or list of texts), e.g.
    # [summary1, summary2, summary3]: evaluate scores a prediction against its best reference.
    # null: the completion is the reference (or, when its field holds a list, each item is).
    references: list[str] | None = Field(None, min_length=1)

    # A mixture: several sources, each with its own path and optionally columns, template
    # and a weight or row cap; sampled by split.seed. null: the one source data.path names.
    sources: list[SourceConfig] | None = Field(None, min_length=1)

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
    # A built-in name (dialogue_summary, instruction, question_answer, chat) or a template
    # string with {field} placeholders.
    template: str = "dialogue_summary"
    completion: str | None = None  # completion template; required with a custom template

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
    # What the model learns: causal_lm (a decoder-only LM continues the prompt), seq2seq (an
    # encoder-decoder such as T5 writes the completion from the prompt) or
    # sequence_classification (a new head picks one of `labels` for the prompt text).
    task: Literal[TASKS] = "causal_lm"
    # sequence_classification only: the class names, in head order. A record's completion
    # must render to one of them, or to its index (0, 1, ...) for integer-coded data.
    labels: list[str] | None = None
    name_or_path: str = "models/smoke-llama"  # Hub id or a local directory under models/
    revision: str | None = None  # required for Hub ids: a tag or commit sha
    trust_remote_code: bool = False
    # Pickle checkpoints (.bin/.pt) can run code when loaded: refused unless this is true.
    allow_pickle_weights: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"

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
    load_in_4bit: bool = True  # QLoRA; false trains LoRA on the unquantized base
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Dtype = "auto"  # auto: follows train.precision


class LoraConfig(Section):
    r: int = Field(16, ge=1)
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"


PROMPT_LEARNING = ("prompt_tuning", "prefix_tuning", "p_tuning")
UNQUANTIZED_ONLY = ("loha", "lokr")  # PEFT implements them for plain nn.Linear layers only


class PeftMethodConfig(Section):
    # lora (QLoRA with quant.load_in_4bit), dora, adalora, loha, lokr and ia3 adapt the layers
    # in lora.target_modules (with lora.r / lora_alpha / lora_dropout where the method has
    # them) and can be merged into the base; prompt_tuning, prefix_tuning and p_tuning learn
    # virtual tokens in front of the input and leave the base untouched (not mergeable).
    method: Literal["lora", "dora", "adalora", "loha", "lokr", "ia3", *PROMPT_LEARNING] = "lora"
    num_virtual_tokens: int = Field(16, ge=1)  # soft prompts only
    adalora_target_r: int = Field(4, ge=1)  # AdaLoRA prunes from lora.r down to this average rank


class TokenizeConfig(Section):
    max_length: int = Field(512, ge=8)
    completion_only_loss: bool = True
    # Which end of a too-long prompt to cut: "left" keeps the end of the prompt (its cue, e.g.
    # "Summary:") and the whole completion; "right" cuts the end of the sequence.
    truncation_side: Literal["left", "right"] = "left"
    overlong: Literal["truncate", "drop"] = "truncate"
    preview_rows: int = Field(3, ge=0)


# train.report_to's trackers and the package each needs (checked when train starts).
TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "dvclive": "dvclive"}


class TrainConfig(Section):
    seed: int = 42
    max_steps: int = Field(150, ge=-1)  # -1: train for num_train_epochs instead
    num_train_epochs: float = Field(1.0, gt=0)
    per_device_train_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    # Data-parallel processes on this host (one per GPU; gloo processes on a CPU-only host).
    # The effective batch is per_device_train_batch_size * gradient_accumulation_steps * this.
    num_processes: int = Field(1, ge=1)
    learning_rate: float = Field(3e-3, gt=0)
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup",
                               "cosine_with_restarts"] = "cosine"
    warmup_steps: float = Field(0.05, ge=0)  # below 1: a fraction of the total steps
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    optim: str = "paged_adamw_8bit"  # needs CUDA; falls back to adamw_torch on CPU (logged)
    gradient_checkpointing: bool = True
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 > fp16 > fp32 by hardware
    # "group_by_length" batches rows of similar length together (less padding per batch).
    train_sampling_strategy: Literal["random", "group_by_length"] = "random"
    # Concatenate each batch into one row with position ids restarting at every example: no
    # padding is computed, and the attention mask derived from the position ids keeps examples
    # apart (train checks that on the model before the first step). auto: on with
    # flash_attention_2, whose varlen kernels attend within each example only; off with sdpa
    # and eager, which build a dense mask over the whole packed row (slower: BENCHMARKS.md).
    padding_free: Literal["auto"] | bool = "auto"
    torch_compile: bool = False  # compile the model with torch.compile (first steps are slower)
    use_liger_kernel: bool = False  # Liger's fused kernels; needs the liger-kernel package (CUDA)
    tf32: Literal["auto"] | bool = "auto"  # auto: on for GPUs that have TF32 (Ampere and newer)
    logging_steps: int = Field(1, ge=1)
    save_steps: int = Field(50, ge=1)  # checkpoint every N steps; a rerun resumes from the last
    save_total_limit: int = Field(2, ge=1)
    # Experiment trackers the Trainer (and align's DPO) logs params and the loss curve to,
    # through transformers' own integrations; []: none (the run stays offline). Each writes
    # locally: tensorboard and dvclive under logs/, mlflow to MLFLOW_TRACKING_URI (default
    # mlruns/ in the repo); wandb follows WANDB_* variables (WANDB_MODE=offline keeps it local).
    report_to: list[str] = []

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
    # Preference tuning with TRL's DPO, starting from the SFT adapter. Off by default: the
    # stage then only records that it is off.
    enabled: bool = False
    # Records with the data's template fields (data.columns applies) plus `chosen` and
    # `rejected` completions, under data/raw/; the id's split (data.split) decides which
    # pairs are held out for the reported reward accuracy and margins.
    path: str = "data/raw/preferences.jsonl"
    beta: float = Field(0.1, gt=0)  # strength of the KL pull towards the reference (the SFT model)
    max_steps: int = Field(30, ge=1)
    per_device_train_batch_size: int = Field(4, ge=1)
    per_device_eval_batch_size: int = Field(8, ge=1)
    learning_rate: float = Field(5e-4, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _local(self) -> AlignConfig:
        if not Path(self.path).as_posix().startswith("data/raw/"):
            raise ValueError(f"path: {self.path} must be under data/raw/ (the folder dvc.yaml tracks)")
        return self


class EvaluateConfig(Section):
    # Generation settings, shared with export's re-scoring:
    max_new_tokens: int = Field(48, ge=1)
    per_device_eval_batch_size: int = Field(16, ge=1)
    max_samples: int | None = Field(None, ge=1)  # score the first N test rows (None: all)
    # Scoring settings, read by evaluate only:
    use_stemmer: bool = True
    bootstrap_samples: int = Field(1000, ge=10)
    confidence_level: float = Field(0.95, gt=0, lt=1)
    seed: int = 0
    preview_rows: int = Field(5, ge=0)
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
    torch_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # "dequantized": merge into the 4-bit weights the adapter was trained against, cast up to
    # torch_dtype (the merged model then reproduces the tuned one); "original": reload the
    # full-precision checkpoint and merge there (what most tutorials do; drifts a little).
    merge_into: Literal["dequantized", "original"] = "dequantized"
    check_prompts: int = Field(4, ge=1)  # test prompts whose logits are compared
    logits_atol: float = Field(1e-3, gt=0)  # max |merged - (base + adapter)| logit difference
    # max |merged - adapter| of the task's headline metric on the test split (ROUGE-L for
    # the generative tasks, accuracy for classification)
    metric_atol: float = Field(0.02, ge=0)
    # Also write the merged model as GGUF (llama.cpp's format) in this tensor type, through
    # llama.cpp's own converter (`make gguf-converter`), then load it back with transformers
    # and re-score it on the test split (metric_atol applies). null: no GGUF.
    gguf: Literal["f32", "f16", "bf16", "q8_0"] | None = None


class PromoteConfig(Section):
    # Promote the exported model (registry/latest.json) only when it beats the champion (the
    # model registry/latest.json points at; the base before anything was promoted) by at least
    # this much on the task's headline metric on the same test rows (ROUGE-L for causal_lm and
    # seq2seq, accuracy for sequence_classification).
    min_gain: float = 0.0
    max_regression: float | None = Field(None, ge=0, description=(
        "Refuse promotion when any task of evaluate.lm_eval_tasks drops by more than this from "
        "the base to the tuned model, in the task's main metric (its first; e.g. acc, 0-1); "
        "null: the scores are reported, not checked."))


class Params(Section):
    data: DataConfig
    prompt: PromptConfig = PromptConfig()
    model: ModelConfig = ModelConfig()
    quant: QuantConfig = QuantConfig()
    lora: LoraConfig = LoraConfig()
    peft: PeftMethodConfig = PeftMethodConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    train: TrainConfig = TrainConfig()
    align: AlignConfig = AlignConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()
    promote: PromoteConfig = PromoteConfig()

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
