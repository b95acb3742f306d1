"""Loading the tokenizer and the base model the way every stage needs them.

Heavy imports (torch, transformers, peft) stay inside functions so `finetune check` and
`finetune --help` answer fast.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.config import ModelConfig, Params
from tasks.errors import PipelineError
from tasks.io import read_json_state
from tasks.templates import TEMPLATE_SOURCE

if TYPE_CHECKING:
    import torch

log = logging.getLogger("finetune")


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def process_device() -> str:
    """This process's device: its own GPU (LOCAL_RANK) when a launcher started one process
    per GPU, so QLoRA's 4-bit weights are placed on that GPU only."""
    if device() == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def bf16_supported() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def compute_dtype(params: Params) -> torch.dtype:
    """The dtype matmuls run in: bnb's compute dtype, following the training precision."""
    import torch

    name = params.quant.bnb_4bit_compute_dtype
    if name == "auto":
        precision = resolve_precision(params.train.precision)
        name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]
    return getattr(torch, name)


def resolve_precision(precision: str) -> str:
    import torch

    if precision != "auto":
        return precision
    if bf16_supported():
        return "bf16"
    return "fp16" if torch.cuda.is_available() else "fp32"


def _source_kwargs(model: ModelConfig) -> dict[str, Any]:
    if model.is_local:
        _check_folder(Path(model.name_or_path))
    if model.trust_remote_code:
        log.warning("trust_remote_code is ON: code shipped with %s will run", model.name_or_path)
    else:
        refuse_remote_code(model)
    return {"revision": model.revision, "trust_remote_code": model.trust_remote_code}


def _check_folder(folder: Path) -> None:
    """A missing local model ends in a message about the folder, not (as transformers
    reports it) about failing to reach the Hub."""
    if not folder.is_dir():
        raise PipelineError(f"model.name_or_path: {folder} does not exist (a local model is a "
                            f"folder under models/ with config.json and safetensors weights)")
    if not (folder / "config.json").is_file():
        raise PipelineError(f"model.name_or_path: {folder}/config.json is missing: the folder is not "
                            "a complete model (save it with save_pretrained)")
    check_model_files(folder)


# JSON files of a model folder that transformers parses when it loads the model or tokenizer.
MODEL_JSON_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json", "vocab.json",
                    "preprocessor_config.json", "model.safetensors.index.json")
# safetensors refuses a header longer than this (its MAX_HEADER_SIZE).
SAFETENSORS_MAX_HEADER = 100_000_000
AGAIN = "copy or download the model again"
# (folder, (name, mtime_ns, size) per file) of model folders found whole in this process.
_checked: set[tuple[str, tuple[tuple[str, int, int], ...]]] = set()


def check_model_files(folder: Path) -> None:
    """Refuses a model folder whose weights or JSON files are damaged (an interrupted copy or
    download), naming the file, before a loader fails deep inside safetensors or tokenizers.
    Reads only the safetensors headers, not the tensors; a folder is checked once per process
    unless its files change."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and
                   (p.suffix == ".safetensors" or p.name in MODEL_JSON_FILES))
    key = (str(folder.resolve()), tuple((p.name, (st := p.stat()).st_mtime_ns, st.st_size) for p in files))
    if key in _checked:
        return
    for path in files:
        if path.suffix == ".safetensors":
            _check_safetensors(path)
        else:
            _check_json(path)
    _check_shards(folder)
    _checked.add(key)


def _check_json(path: Path) -> Any:
    return read_json_state(path, recover=AGAIN)


def _check_safetensors(path: Path) -> None:
    """The layout safetensors checks: an 8-byte little-endian header length, a JSON header
    of tensors with data_offsets, and exactly the bytes those offsets cover after it."""
    size = path.stat().st_size
    with path.open("rb") as f:
        length = int.from_bytes(f.read(8), "little") if size >= 8 else None
        if length is None or length > min(size - 8, SAFETENSORS_MAX_HEADER):
            found = "shorter than a header" if length is None else f"header length {_bytes(length)}"
            raise PipelineError(f"{path}: damaged or cut short ({found}, file holds {_bytes(size)}): {AGAIN}")
        raw = f.read(length)
    try:
        ends = [entry["data_offsets"][1] for name, entry in json.loads(raw).items() if name != "__metadata__"]
        if not all(type(end) is int for end in ends):
            raise TypeError
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise PipelineError(f"{path}: damaged or cut short (its header is not the JSON table of "
                            f"tensors safetensors writes): {AGAIN}") from None
    data = max(ends, default=0)
    if 8 + length + data != size:
        raise PipelineError(f"{path}: damaged or cut short (header says {_bytes(data)} of tensors, "
                            f"file holds {_bytes(size - 8 - length)}): {AGAIN}")


def _check_shards(folder: Path) -> None:
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return
    weight_map = _check_json(index).get("weight_map")
    shards = {str(s) for s in weight_map.values()} if isinstance(weight_map, dict) else set()
    missing = sorted(s for s in shards if not (folder / s).is_file())
    if missing:
        raise PipelineError(f"{folder / missing[0]}: missing, but {index} lists it"
                            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: {AGAIN}")


def _bytes(n: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


# Files of a model folder whose `auto_map` names code for transformers to import.
AUTO_MAP_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json")


def refuse_remote_code(model: ModelConfig) -> None:
    """Refuses a local model folder that ships code (an `auto_map`) while
    model.trust_remote_code is false, before transformers could import that code."""
    folder = Path(model.name_or_path)
    for name in AUTO_MAP_FILES:
        try:
            config = json.loads((folder / name).read_text(encoding="utf-8-sig"))
        except (OSError, ValueError):
            continue  # absent or unreadable: the loader reports it
        auto_map = config.get("auto_map") if isinstance(config, dict) else None
        if not isinstance(auto_map, dict) or not auto_map:
            continue
        first = next(iter(auto_map.values()))
        reference = first[0] if isinstance(first, list) else str(first)
        # "module.Class", or "other/repo--module.Class" for code kept in another Hub repo
        module = reference.split("--")[-1].rsplit(".", 1)[0]
        raise PipelineError(_remote_code_message(model, f"{folder / name} (auto_map) asks to "
                                                        f"run {folder / module}.py"))


def _remote_code_message(model: ModelConfig, what: str) -> str:
    return (f"model.trust_remote_code is false but {what}: set model.trust_remote_code: true "
            f"only if you have read that code and trust it, or use a model transformers ships")


def _load_error(model: ModelConfig, err: Exception, what: str = "") -> PipelineError:
    """A loader's failure as one line naming the key to fix."""
    if "trust_remote_code" in str(err):
        return PipelineError(_remote_code_message(model, f"{model.name_or_path} ships custom code"))
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return PipelineError(f"model.name_or_path: cannot load {what}{model.name_or_path!r}: {first_line}")


def load_config(params: Params):
    """The base model's config (shape and architecture), without its weights."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(params.model.name_or_path, **_source_kwargs(params.model),
                                          **task_kwargs(params.model))
    except (OSError, ValueError) as err:
        raise _load_error(params.model, err, "the config of ") from None


def load_tokenizer(model: ModelConfig, path: str | None = None):
    """The base model's tokenizer, with model.chat_template's file as its chat template when
    set, or the pipeline's own copy at `path` (pad token fixed, and the chat template it was
    trained with: tokenize saves the base's)."""
    from transformers import AutoTokenizer

    try:
        if path is not None:
            return AutoTokenizer.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path, **_source_kwargs(model))
    except (OSError, ValueError) as err:
        if path is not None:
            raise PipelineError(f"model.name_or_path: cannot load a tokenizer from {path!r}: {err}") from None
        raise _load_error(model, err, "a tokenizer from ") from None
    if model.chat_template is not None:
        set_chat_template(tokenizer, Path(model.chat_template))
    return tokenizer


def read_chat_template(path: Path) -> str:
    """model.chat_template's text."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PipelineError(f"model.chat_template: cannot read {path}: {err}") from None
    if not text.strip():
        raise PipelineError(f"model.chat_template: {path} is empty: it must hold a Jinja chat template")
    return text


def set_chat_template(tokenizer, path: Path) -> None:
    """Replace the tokenizer's chat template with model.chat_template's file, once it compiles
    (as transformers compiles it, {% generation %} included): a typo stops here, naming the
    file and line, not at the first chat rendered."""
    import jinja2

    text = read_chat_template(path)
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=text, tokenize=False)
    except jinja2.TemplateSyntaxError as err:
        raise PipelineError(f"model.chat_template: {path} line {err.lineno} is not a valid Jinja "
                            f"template: {err.message}") from None
    except (jinja2.TemplateError, ValueError, TypeError):
        pass  # it compiled; a template may refuse this one-message probe (raise_exception)
    tokenizer.chat_template = text
    setattr(tokenizer, TEMPLATE_SOURCE, str(path))


PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# The transformers auto class of each model.task.
AUTO_CLASSES = {"causal_lm": "AutoModelForCausalLM", "seq2seq": "AutoModelForSeq2SeqLM",
                "sequence_classification": "AutoModelForSequenceClassification"}
# Classification heads transformers models use; they start random and are trained in full
# (PEFT's modules_to_save), so they stay unquantized.
HEAD_MODULES = ["classifier", "score"]


def model_class(task: str):
    import transformers

    return getattr(transformers, AUTO_CLASSES[task])


def task_kwargs(model: ModelConfig) -> dict[str, Any]:
    """from_pretrained arguments a task needs: the label map of a classification head."""
    if model.task != "sequence_classification":
        return {}
    labels = model.labels or []
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)}}


def load_base(params: Params, *, quantized: bool, torch_dtype: torch.dtype | None = None):
    """The base model of `model.task`, in 4-bit NF4 (QLoRA) when `quantized`, else in
    `torch_dtype`."""
    from transformers import BitsAndBytesConfig

    dtype = compute_dtype(params)
    kwargs: dict[str, Any] = {"dtype": torch_dtype or dtype,
                              "attn_implementation": params.model.attn_implementation,
                              # None lets transformers fall back to pickle .bin weights.
                              "use_safetensors": None if params.model.allow_pickle_weights else True}
    if params.model.allow_pickle_weights:
        log.warning("model.allow_pickle_weights is ON: pickle checkpoints may run code when loaded")
    if quantized:
        q = params.quant
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=q.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant, bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=HEAD_MODULES if params.model.task == "sequence_classification" else None)
        kwargs["device_map"] = {"": process_device()}
    if params.model.task == "sequence_classification":
        from transformers import set_seed

        # The new head starts random: the same seed gives every stage the same start, so the
        # base's scores reproduce and train starts from the head evaluate scores as "base".
        set_seed(params.train.seed)
    try:
        model = model_class(params.model.task).from_pretrained(
            params.model.name_or_path, **_source_kwargs(params.model), **task_kwargs(params.model),
            **kwargs)
    except (OSError, ValueError) as err:
        hint = ""
        folder = Path(params.model.name_or_path)
        # A local folder without pickle files lacks its weights altogether: no pickle hint.
        pickles = not params.model.is_local or not folder.is_dir() or any(
            p.suffix in PICKLE_SUFFIXES for p in folder.iterdir())
        if not params.model.allow_pickle_weights and pickles and "safetensors" in str(err).lower():
            hint = (" (only safetensors weights are loaded; pickle .bin/.pt checkpoints can run "
                    "code: convert them, or set model.allow_pickle_weights: true if you trust them)")
        raise PipelineError(f"{_load_error(params.model, err)}{hint}") from None
    if not quantized:
        model.to(process_device())
    elif device() == "cpu":
        _one_cpu_path(model)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and params.tokenize.max_length > context:
        raise PipelineError(f"tokenize.max_length ({params.tokenize.max_length}) is past the model's "
                            f"context of {context} tokens (max_position_embeddings): lower it")
    return model


def load_standalone(params: Params, folder: Path, torch_dtype: torch.dtype):
    """A saved whole model (an export, or a full fine-tune's artifacts/adapter) and its
    tokenizer, loaded with the base's loader (same safety checks) in `torch_dtype`."""
    saved = params.model.model_copy(update={"name_or_path": str(folder), "revision": None})
    model = load_base(params.model_copy(update={"model": saved}), quantized=False, torch_dtype=torch_dtype)
    model.eval()
    return model, load_tokenizer(saved, str(folder))


def _one_cpu_path(model) -> None:
    """Keeps 4-bit layers on bitsandbytes' fp32 dequantize-and-matmul path on every CPU.

    On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights in eval mode for a bf16
    kernel: evaluate's logits would then differ by ~1e-2 from the path training used and from
    other CPUs (export's merged-vs-adapter check fails), and it breaks on layers narrower than
    its 64-feature blocks."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def match_vocab(model, tokenizer) -> None:
    """Grow the embeddings when tokenize added a pad token the base vocabulary lacks, and tell
    the model which id pads (a decoder's classification head reads the last non-pad token)."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
