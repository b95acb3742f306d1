"""The rules that combine keys of several sections, which no single section can check, and
the rules between train's checkpointing, validation and early-stopping keys, kept here so each
message names its keys in full (train.save_steps, train.eval_steps) as the others do.

Each rule takes the whole `Params` and returns its problems (empty when the params are fine),
so a rule can be called, and tested, on its own. `Params` runs every rule in `RULES`, in that
order, and reports all their problems together. The JSON Schema cannot express them: only
`finetune check` (and every stage, which loads the params) applies them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from tasks import templates
from tasks.config.data import reference_field
from tasks.config.model import FULL_FINETUNE, PROMPT_LEARNING, SHARDED_METHODS, UNQUANTIZED_ONLY

if TYPE_CHECKING:  # Params runs these rules, so it imports this module, not the other way round
    from tasks.config.params import Params


def max_new_tokens_fit(params: Params) -> list[str]:
    if params.model.task == "causal_lm" and params.evaluate.max_new_tokens >= params.tokenize.max_length:
        return [f"evaluate.max_new_tokens ({params.evaluate.max_new_tokens}) must be below "
                f"tokenize.max_length ({params.tokenize.max_length}) to leave room for the prompt"]
    return []


def dequantized_merge_needs_4bit(params: Params) -> list[str]:
    if params.export.merge_into == "dequantized" and not params.quant.load_in_4bit:
        return ["export.merge_into 'dequantized' needs quant.load_in_4bit: true "
                "(with an unquantized base, use 'original')"]
    return []


def method_has_4bit(params: Params) -> list[str]:
    method = params.peft.method
    if method in UNQUANTIZED_ONLY and params.quant.load_in_4bit:
        return [f"peft.method {method} has no 4-bit (bitsandbytes) implementation in "
                "PEFT: set quant.load_in_4bit: false (and export.merge_into: original)"]
    return []


def full_finetune_unquantized(params: Params) -> list[str]:
    if params.peft.full_finetune and params.quant.load_in_4bit:
        return ["peft.method none trains every weight, and 4-bit weights cannot be trained "
                "(QLoRA trains adapters on them): set quant.load_in_4bit: false (and "
                "export.merge_into: original)"]
    return []


def prompt_learning_unpacked(params: Params) -> list[str]:
    method = params.peft.method
    if method in PROMPT_LEARNING and params.train.padding_free is True:
        return [f"peft.method {method} puts virtual tokens in front of each sequence, "
                "which packing would share between examples: set train.padding_free: false"]
    return []


def prefix_tuning_without_checkpointing(params: Params) -> list[str]:
    if params.peft.method == "prefix_tuning" and params.train.gradient_checkpointing is True:
        return ["peft.method prefix_tuning feeds its prefixes as a KV cache, which PEFT "
                "cannot combine with gradient checkpointing: set "
                "train.gradient_checkpointing: false"]
    return []


def align_supported(params: Params) -> list[str]:
    method = params.peft.method  # none: align_needs_adapter says why
    if params.align.enabled and (params.prompt.template == "chat" or method not in ("lora", FULL_FINETUNE)):
        return ["align.enabled needs prompt.template other than chat and peft.method "
                "lora (align's methods support those so far)"]
    return []


def align_needs_adapter(params: Params) -> list[str]:
    if params.align.enabled and params.peft.full_finetune:
        return ["align.enabled goes on training train's adapter (every align.method), and peft.method none "
                "writes a whole model instead: set align.enabled: false"]
    return []


def padding_free_causal_lm_only(params: Params) -> list[str]:
    task = params.model.task
    if task != "causal_lm" and params.train.padding_free is True:
        return [f"train.padding_free packs examples for causal LMs only (model.task is "
                f"{task}): set it to auto or false"]
    return []


def chat_template_causal_lm_only(params: Params) -> list[str]:
    task = params.model.task
    if task != "causal_lm" and params.prompt.template == templates.CHAT:
        return [f"prompt.template chat renders a causal LM's chat template; model.task "
                f"{task} needs a text template"]
    return []


def align_causal_lm_only(params: Params) -> list[str]:
    task = params.model.task
    if task != "causal_lm" and params.align.enabled:
        return [f"align.enabled needs model.task causal_lm (align.method scores completions "
                f"of a causal LM; task is {task})"]
    return []


def kto_batch_of_two(params: Params) -> list[str]:
    a = params.align
    if a.enabled and a.method == "kto" and a.per_device_train_batch_size < 2:
        return [f"align.method kto estimates its KL term by pairing each prompt with another "
                f"row's completion in the same batch: set align.per_device_train_batch_size to 2 "
                f"or more (it is {a.per_device_train_batch_size})"]
    return []


def grpo_whole_groups(params: Params) -> list[str]:
    a = params.align
    if a.enabled and a.method == "grpo" and a.per_device_train_batch_size % a.num_generations:
        return [f"align.per_device_train_batch_size ({a.per_device_train_batch_size}) counts GRPO's "
                f"sampled answers and must hold whole groups of align.num_generations "
                f"({a.num_generations}): e.g. {a.num_generations * max(1, a.per_device_train_batch_size // a.num_generations)}"]
    return []


def grpo_completion_fits(params: Params) -> list[str]:
    a, length = params.align, params.tokenize.max_length
    if a.enabled and a.method == "grpo" and a.max_completion_length >= length:
        return [f"align.max_completion_length ({a.max_completion_length}) must be below "
                f"tokenize.max_length ({length}) to leave room for the prompt"]
    return []


def kto_weights_for_kto(params: Params) -> list[str]:
    a = params.align
    weighted = [k for k in ("desirable_weight", "undesirable_weight") if getattr(a, k) != 1.0]
    if a.method != "kto" and weighted:
        return [f"align.{weighted[0]} weights KTO's loss and align.method is {a.method}: set "
                f"align.method: kto, or leave the weight at 1.0"]
    return []


def references_fill_one_field(params: Params) -> list[str]:
    if params.data.references and (params.model.task == "sequence_classification"
                                   or reference_field(params.prompt) is None):
        return ["data.references needs a generative model.task and a text template whose "
                "completion has exactly one {field} (each reference fills it)"]
    return []


def gguf_needs_merged_causal_lm(params: Params) -> list[str]:
    if params.export.gguf and (params.model.task != "causal_lm" or params.peft.method in PROMPT_LEARNING):
        return ["export.gguf needs model.task causal_lm and a peft.method that merges "
                "(GGUF holds one standalone decoder model)"]
    return []


def serve_check_needs_merged_causal_lm(params: Params) -> list[str]:
    if params.promote.serve_check_rows and (params.model.task != "causal_lm"
                                            or params.peft.method in PROMPT_LEARNING):
        return ["promote.serve_check_rows serves the candidate with transformers serve's completions "
                "API: it needs model.task causal_lm and a peft.method that merges (set it to 0 "
                f"otherwise; task is {params.model.task}, method {params.peft.method})"]
    return []


def lm_eval_needs_causal_lm(params: Params) -> list[str]:
    task, method = params.model.task, params.peft.method
    # seq2seq is the harness's other backend, but untested here with an adapter attached.
    if params.evaluate.lm_eval_tasks and (task != "causal_lm" or method in PROMPT_LEARNING):
        return ["evaluate.lm_eval_tasks scores a causal LM's log-likelihoods: it needs "
                "model.task causal_lm and a peft.method that keeps the input as it is "
                f"(not {', '.join(PROMPT_LEARNING)}; task is {task}, method {method})"]
    return []


def max_regression_needs_lm_eval(params: Params) -> list[str]:
    if params.promote.max_regression is not None and not params.evaluate.lm_eval_tasks:
        return ["promote.max_regression checks the tasks of evaluate.lm_eval_tasks, which is "
                "empty: list tasks there, or set max_regression to null"]
    return []


def adalora_needs_max_steps(params: Params) -> list[str]:
    if params.peft.method == "adalora" and params.train.max_steps < 1:
        return ["peft.method adalora schedules its rank budget over train.max_steps: "
                "set a positive train.max_steps"]
    return []


def adalora_target_below_r(params: Params) -> list[str]:
    if params.peft.method == "adalora" and params.peft.adalora_target_r >= params.lora.r:
        return [f"peft.adalora_target_r ({params.peft.adalora_target_r}) must be below "
                f"lora.r ({params.lora.r}), the rank AdaLoRA starts from and prunes"]
    return []


def early_stopping_needs_eval_steps(params: Params) -> list[str]:
    if params.train.early_stopping_patience is not None and params.train.eval_steps is None:
        return ["train.early_stopping_patience counts evaluations, and train.eval_steps is null: "
                "set eval_steps (e.g. 50), or early_stopping_patience: null"]
    return []


def save_steps_on_eval_steps(params: Params) -> list[str]:
    # The Trainer's own rule for load_best_model_at_end: the best checkpoint must be one it saved.
    t = params.train
    if t.eval_steps is not None and t.save_steps % t.eval_steps:
        return [f"train.save_steps ({t.save_steps}) must be a multiple of train.eval_steps "
                f"({t.eval_steps}), so that every checkpoint has its validation loss to pick the "
                f"best one by: e.g. save_steps: {t.eval_steps * max(1, round(t.save_steps / t.eval_steps))}"]
    return []


def fsdp_across_processes(params: Params) -> list[str]:
    t = params.train
    if t.fsdp and t.world_size == 1:
        return ["train.fsdp shards the model across training processes, and train.num_processes "
                "* train.num_nodes is 1: set num_processes (or num_nodes) to 2 or more, or fsdp: false"]
    return []


def fsdp_shards_what_trains(params: Params) -> list[str]:
    if not params.train.fsdp:
        return []
    if params.quant.load_in_4bit:
        return ["train.fsdp does not shard bitsandbytes 4-bit weights: set quant.load_in_4bit: "
                "false (and export.merge_into: original), or fsdp: false"]
    if params.peft.method not in SHARDED_METHODS:
        return [f"train.fsdp shards peft.method {' or '.join(SHARDED_METHODS)} (none: full "
                f"fine-tuning), not {params.peft.method}: set fsdp: false, or one of those methods"]
    return []


# The order problems are reported in.
RULES: tuple[Callable[[Params], list[str]], ...] = (
    max_new_tokens_fit,
    dequantized_merge_needs_4bit,
    method_has_4bit,
    full_finetune_unquantized,
    prompt_learning_unpacked,
    prefix_tuning_without_checkpointing,
    align_supported,
    align_needs_adapter,
    padding_free_causal_lm_only,
    chat_template_causal_lm_only,
    align_causal_lm_only,
    kto_batch_of_two,
    grpo_whole_groups,
    grpo_completion_fits,
    kto_weights_for_kto,
    references_fill_one_field,
    gguf_needs_merged_causal_lm,
    serve_check_needs_merged_causal_lm,
    lm_eval_needs_causal_lm,
    max_regression_needs_lm_eval,
    adalora_needs_max_steps,
    adalora_target_below_r,
    early_stopping_needs_eval_steps,
    save_steps_on_eval_steps,
    fsdp_across_processes,
    fsdp_shards_what_trains,
)
