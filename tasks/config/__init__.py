"""Typed params: the only reader of params.yaml.

Every section is a pydantic model with `extra="forbid"`, so a typo fails at once naming the
key path. Field names are the argument names of the library each one feeds
(`LoraConfig(r=...)`, `TrainingArguments(learning_rate=...)`, `BitsAndBytesConfig(...)`),
so no renaming layer exists. `load_params` reports every problem together.

    finetune check --params params.yaml

One module per topic, each section's fields with the checks that need only that section:

- `base`: the `Section` base model, the folders dvc.yaml tracks, the local data formats;
- `data`: data.* and prompt.*;
- `model`: model.*, quant.*, lora.* and peft.*;
- `training`: tokenize.*, train.* and align.*;
- `evaluation`: evaluate.*, export.* and promote.*;
- `rules`: the checks across sections, one function each, run in the order of `RULES`;
- `params`: `Params`, the root model composing the sections (and its `digest`);
- `loading`: reading and validating params.yaml, problem messages, overrides.

Everything is imported from here (`from tasks.config import Params`), so callers do not
depend on which module a name lives in. Nothing here imports torch, transformers, peft,
datasets or prefect: `finetune check` must stay fast and run without them.
"""

from tasks.config.base import (DATA_DIR, LM_EVAL_DIR, LOCAL_DATA_SUFFIXES, MODELS_DIR, SPLIT_NAMES, TAG, Files,
                               Section, data_suffix)
from tasks.config.data import (DataConfig, DataPath, OptionalDataPath, PathShapes, PromptConfig, SourceConfig,
                               SplitConfig, SplitFiles, _path_shape, local_data_problem, path_kind,
                               reference_field)
from tasks.config.evaluation import EvaluateConfig, ExportConfig, PromoteConfig
from tasks.config.loading import (SHORT, ParamsOverride, _allowed, _flatten, _key_path, _partial,
                                  apply_overrides, check_dvc_params, check_options, deep_merge, describe,
                                  fill_dvc_params, load_params, lookup, missing_dvc_params, parse_params,
                                  read_yaml)
from tasks.config.model import (FULL_FINETUNE, PROMPT_LEARNING, TASKS, UNQUANTIZED_ONLY, Dtype, LoraConfig, ModelConfig,
                                PeftMethodConfig, QuantConfig)
from tasks.config.params import Params
from tasks.config.rules import RULES
from tasks.config.training import TRACKERS, AlignConfig, RewardConfig, TokenizeConfig, TrainConfig

__all__ = [
    "DATA_DIR", "FULL_FINETUNE", "LM_EVAL_DIR", "LOCAL_DATA_SUFFIXES", "MODELS_DIR", "PROMPT_LEARNING", "RULES", "SHORT",
    "SPLIT_NAMES", "TAG", "TASKS", "TRACKERS", "UNQUANTIZED_ONLY", "AlignConfig", "DataConfig", "DataPath",
    "Dtype", "EvaluateConfig", "ExportConfig", "Files", "LoraConfig", "ModelConfig", "OptionalDataPath",
    "Params", "ParamsOverride", "PathShapes", "PeftMethodConfig", "PromoteConfig", "PromptConfig",
    "QuantConfig", "RewardConfig", "Section", "SourceConfig", "SplitConfig", "SplitFiles", "TokenizeConfig", "TrainConfig",
    "_allowed", "_flatten", "_key_path", "_partial", "_path_shape", "apply_overrides", "data_suffix",
    "check_dvc_params", "check_options", "deep_merge", "describe", "fill_dvc_params", "load_params",
    "local_data_problem", "lookup", "missing_dvc_params", "parse_params", "path_kind", "read_yaml", "reference_field",
]
