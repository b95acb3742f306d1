"""The PEFT method of params `peft.method`, built from the `lora` and `peft` sections.

One place turns params into a PEFT config, so train, evaluate and export agree on what
an adapter is and whether it can be merged into the base. With `peft.method: none` (full
fine-tuning) there is no adapter: train writes the whole model where the adapter goes
(ws.adapter, a folder with config.json instead of adapter_config.json), and the later stages
load it as a standalone model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.config import FULL_FINETUNE, PROMPT_LEARNING, Params
from tasks.errors import PipelineError
from tasks.io import check_adapter, read_json_folder
from tasks.workspace import Workspace

# PEFT's task type of each model.task. SEQ_CLS also trains the new classification head in
# full and saves it with the adapter (PEFT's modules_to_save).
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM",
              "sequence_classification": "SEQ_CLS"}


def tuned_adapter(params: Params, ws: Workspace) -> Path:
    """The adapter evaluate and export use: the aligned one (align.method) when align is on,
    else SFT's; its JSON files checked (check_adapter) before PEFT or the tokenizer reads them.
    With full fine-tuning, train's whole model (its weights are checked when it loads, as a
    base's are)."""
    folder, stage = (ws.aligned, "align") if params.align.enabled else (ws.adapter, "train")
    recover = f"rerun `dvc repro {stage}`"
    if not params.peft.full_finetune:
        return check_adapter(folder, recover)
    if (folder / "adapter_config.json").is_file():
        raise PipelineError(f"{folder} holds a PEFT adapter, but peft.method is none (train writes the "
                            f"whole model there): {recover}")
    read_json_folder(folder, recover=recover, required={"config.json": {"model_type": str}})
    return folder


def mergeable(params: Params) -> bool:
    """Soft prompts are extra inputs, not weight deltas: there is nothing to merge; a full
    fine-tune is the model itself."""
    return params.peft.method not in (*PROMPT_LEARNING, FULL_FINETUNE)


def peft_config(params: Params):
    from peft import (AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig,
                      PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig)

    method, lora = params.peft.method, params.lora
    task_type = TASK_TYPES[params.model.task]
    if method in ("lora", "dora"):
        return LoraConfig(task_type=task_type, use_dora=method == "dora", **lora.model_dump())
    if method == "adalora":
        return AdaLoraConfig(task_type=task_type, init_r=lora.r, target_r=params.peft.adalora_target_r,
                             lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                             target_modules=lora.target_modules, bias=lora.bias,
                             total_step=params.train.max_steps)
    if method in ("loha", "lokr"):
        cls = LoHaConfig if method == "loha" else LoKrConfig
        return cls(task_type=task_type, r=lora.r, alpha=lora.lora_alpha,
                   rank_dropout=lora.lora_dropout, target_modules=lora.target_modules)
    if method == "ia3":
        return IA3Config(task_type=task_type, target_modules=lora.target_modules)
    virtual: dict[str, Any] = {"task_type": task_type,
                               "num_virtual_tokens": params.peft.num_virtual_tokens}
    cls = {"prompt_tuning": PromptTuningConfig, "prefix_tuning": PrefixTuningConfig,
           "p_tuning": PromptEncoderConfig}[method]
    return cls(**virtual)


def takes_prefix_cache(model) -> bool:
    """Whether PEFT's prefix tuning can feed its prefixes to `model`: it passes them as the
    `past_key_values` argument of the model's forward (for classifiers, of the backbone's).

    transformers 5.24 renamed that argument `cache`. PEFT 0.21 then refuses classifiers, and
    for generative models the prefixes go in under the old name, which transformers drops
    whenever generate passes its own cache: evaluate would score a model without them."""
    import inspect

    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return any("past_key_values" in inspect.signature(m.forward).parameters
               for m in (model, backbone) if m is not None)


def check_supported(params: Params, model) -> None:
    """Refuses, before training, a method this model's architecture cannot take."""
    if params.peft.method == "prefix_tuning" and not takes_prefix_cache(model):
        import peft
        import transformers

        raise PipelineError(
            f"peft.method: prefix_tuning needs a model whose forward takes past_key_values, and "
            f"{type(model).__name__} (model.task: {params.model.task}) does not under transformers "
            f"{transformers.__version__} with peft {peft.__version__}; use peft.method prompt_tuning, "
            f"p_tuning or lora, or the locked versions (make setup)")


def settle(model) -> None:
    """Makes the adapter config that will be saved loadable again.

    PEFT resolves IA3's `all-linear` to full module paths but keeps its default feedforward
    modules as short names (`down_proj`), and then refuses its own saved config because they
    are not a subset; name the same modules by their full paths."""
    config = model.peft_config["default"]
    if config.peft_type == "IA3" and config.feedforward_modules and isinstance(config.target_modules, set):
        # PEFT matches feedforward names as suffixes (BERT's is `output.dense`).
        short = set(config.feedforward_modules)
        config.feedforward_modules = {t for t in config.target_modules
                                      if any(t == f or t.endswith(f".{f}") for f in short)}


def adalora_callback():
    """AdaLoRA reallocates ranks from the gradients after every optimizer step; the Trainer
    does not do that by itself."""
    from transformers import TrainerCallback

    class AdaLoraBudget(TrainerCallback):
        def __init__(self):
            self.model = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.model = model

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.model.base_model.update_and_allocate(state.global_step)

    return AdaLoraBudget()
