"""export: merge the adapter into a 16/32-bit base and save a standalone model (or, for soft
prompts, which have no weights to merge, the adapter with a card saying so; with full
fine-tuning, `peft.method: none`, the tuned model itself).

Never merges into 4-bit weights. With `export.merge_into: dequantized` the base is the
4-bit checkpoint the adapter was trained against, dequantized to `export.torch_dtype`, so the
merged model reproduces the tuned one; `original` reloads the full-precision checkpoint.
Before saving it checks that the merged logits equal base + adapter on a few test prompts
(`export.logits_atol`) and that the merged model's headline metric on the test split (ROUGE-L;
accuracy for sequence_classification) equals the adapter's (`export.metric_atol`); either
failing stops the stage with nothing written. A full fine-tune has nothing to merge: the model
train wrote is loaded in `export.torch_dtype`, saved, loaded back from the saved files and
checked against itself the same two ways.

With `export.gguf` set it also writes the merged model as GGUF through llama.cpp's own
converter (tasks/gguf.py), loads the file back with transformers, checks its tokenizer gives
the same ids and re-scores it on the test split (`export.metric_atol` again).

Reads artifacts/adapter/ (artifacts/aligned/ when align is on) and data/prepared/test.jsonl;
writes artifacts/merged/ (safetensors, tokenizer, generation config, README.md model card,
manifest.json, and model-<type>.gguf with export.gguf) and metrics/export.json.

    finetune export
"""

from __future__ import annotations

import json
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

from tasks import gguf
from tasks.adapters import mergeable, tuned_adapter
from tasks.config import Params
from tasks.errors import PipelineError
from tasks.generation import attach_adapter, input_ids, model_batches, outputs, test_rows
from tasks.io import atomic_path, normalize_adapter_config, save_tokenizer, sha256_path, write_json
from tasks.scoring import HEADLINE, scores
from tasks.templates import stop_token_ids
from tasks.workspace import Workspace

log = logging.getLogger("finetune.export")

# The params a merged model is made from (evaluate's scoring settings are not among them;
# dvc.yaml lists exactly these for the export stage).
LINEAGE = ("data", "prompt", "model", "quant", "lora", "peft", "tokenize", "train", "align",
           "export")
LIBRARIES = ("torch", "transformers", "peft", "trl", "datasets", "bitsandbytes", "accelerate",
             "evaluate", "rouge_score", "dvc", "pydantic", "gguf")


def _merge_base(params: Params, tokenizer):
    import torch

    from tasks.modeling import load_base, match_vocab

    dtype = getattr(torch, params.export.torch_dtype)
    if params.export.merge_into == "dequantized":
        base = load_base(params, quantized=True)
        base = base.dequantize().to(dtype)
        # dequantize() leaves this flag set, and PEFT then refuses to merge IA3 into the
        # (no longer 4-bit) weights.
        base.is_loaded_in_4bit = False
    else:
        base = load_base(params, quantized=False, torch_dtype=dtype)
    match_vocab(base, tokenizer)
    return base


def _logits(model, tokenizer, prompts: list[str], params: Params) -> list[Any]:
    """The logits each prompt's answer starts from, in prompt order: the next token's after
    the prompt (causal_lm), the decoder's first token's (seq2seq), the classes' (classification)."""
    import torch

    task = params.model.task
    out: list[Any] = [None] * len(prompts)
    with torch.inference_mode():
        for idx, ids, mask in model_batches(model, tokenizer, prompts, params):
            extra = {}
            if task == "seq2seq":
                start = torch.full((len(idx), 1), model.config.decoder_start_token_id, device=ids.device)
                extra["decoder_input_ids"] = start
            logits = model(input_ids=ids, attention_mask=mask, **extra).logits
            for row, i in enumerate(idx):
                out[i] = (logits[row] if task == "sequence_classification" else logits[row, -1]).float().cpu()
    return out


def _headline(model, tokenizer, prompts: list[str], references: list[str], params: Params) -> float:
    """The task's headline metric (HEADLINE) of the model on the scored test rows."""
    return scores(outputs(model, tokenizer, prompts, params), references, params)[HEADLINE[params.model.task]]["mean"]


def manifest(params: Params, ws: Workspace) -> dict[str, Any]:
    """What the merged model was made from, by content: params, inputs' hashes, libraries.
    No git commit: the folder is a DVC output, and a commit in it would change its hash with
    every commit of the repository (dvc.lock never current). dvc.lock's history says which
    commit computed which hash; push names the commit it pushes from."""
    from tasks.config import ModelConfig

    model: ModelConfig = params.model
    adapter = tuned_adapter(params, ws)
    base = {"name_or_path": model.name_or_path, "revision": model.revision}
    if model.is_local:
        base["sha256"] = sha256_path(Path(model.name_or_path))
    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = None
    return {
        "params_sha256": params.digest(LINEAGE),
        "params": params.model_dump(mode="json", include=set(LINEAGE)),
        "inputs": {"base_model": base, "adapter": adapter.relative_to(ws.root).as_posix(),
                   "adapter_sha256": sha256_path(adapter),
                   "test_split_sha256": sha256_path(ws.prepared / "test.jsonl")},
        "libraries": versions,
    }


def _method(p: Params) -> str:
    quant = f", on the 4-bit {p.quant.bnb_4bit_quant_type} base" if p.quant.load_in_4bit else ""
    if p.peft.full_finetune:
        method = "full fine-tuning (peft.method none): every weight trained, no adapter"
    elif not mergeable(p):
        method = f"{p.peft.method}, {p.peft.num_virtual_tokens} virtual tokens{quant}"
    else:
        rank = "" if p.peft.method == "ia3" else f" r={p.lora.r}, lora_alpha={p.lora.lora_alpha},"
        method = f"{p.peft.method}{quant},{rank} target_modules={p.lora.target_modules}"
    if p.align.enabled:
        method += (f"; then {p.align.method.upper()} on `{p.align.path}` (beta {p.align.beta}, "
                   f"{p.align.max_steps} steps)")
    return method


METRIC_TITLES = {"rougeL": "ROUGE-L", "accuracy": "accuracy"}


def _peft_auto_class(task: str) -> str:
    """What loads an exported adapter (soft prompts): PEFT's twin of the task's auto class."""
    from tasks.modeling import AUTO_CLASSES

    return "AutoPeft" + AUTO_CLASSES[task].removeprefix("Auto")


def _head_kwargs(params: Params) -> str:
    """The label map a classifier's base needs when an adapter is loaded on it (the base's
    own config does not have it)."""
    from tasks.modeling import task_kwargs

    kwargs = task_kwargs(params.model)
    return "".join(f", {k}={v!r}" for k, v in kwargs.items())


def model_card(params: Params, scores: dict[str, Any]) -> str:
    p = params
    metric = METRIC_TITLES[HEADLINE[p.model.task]]
    tuned = "base + adapter"
    if p.peft.full_finetune:
        tuned = "fine-tuned, as train saved it"
        what = (f"A standalone model: every weight of `{p.model.name_or_path}` (revision `{p.model.revision}`)\n"
                f"fine-tuned by this pipeline (full fine-tuning, no adapter), saved in {p.export.torch_dtype}.")
        last = "| this model, read back | {:.4f} |".format(scores["merged"])
    elif mergeable(p):
        what = (f"A standalone model: the {p.peft.method} adapter trained by this pipeline, merged into\n"
                f"`{p.model.name_or_path}` (revision `{p.model.revision}`), saved in {p.export.torch_dtype}.")
        last = "| merged (this model) | {:.4f} |".format(scores["merged"])
    else:
        what = (f"**Not a standalone model.** {p.peft.method} learns virtual tokens that are fed in front "
                f"of every input;\nthere are no weights to merge. This folder is the adapter: load it "
                f"on its base,\n`{p.model.name_or_path}` (revision `{p.model.revision}`), with\n"
                f"`peft.{_peft_auto_class(p.model.task)}.from_pretrained(this_folder{_head_kwargs(p)})`.")
        last = ""
    if "gguf" in scores:
        last += f"\n| `{gguf.file_name(p.export.gguf or '')}` (GGUF, read back by transformers) | {scores['gguf']:.4f} |"
    if p.model.task == "sequence_classification":
        what += f"\n\nTask: sequence classification into {', '.join(p.model.labels or [])} (in head order)."
        scoring = "predicted class"
    else:
        what += f"\n\nTask: {p.model.task}."
        scoring = f"greedy, {p.evaluate.max_new_tokens} new tokens"
    return f"""---
base_model: {p.model.name_or_path}
library_name: {'transformers' if mergeable(p) or p.peft.full_finetune else 'peft'}
tags: [fine-tuned, {'full-fine-tuning' if p.peft.full_finetune else p.peft.method}{', qlora' if p.quant.load_in_4bit and p.peft.method == 'lora' else ''}]
---
# Fine-tuned {p.model.name_or_path}

{what}

- Data: `{p.data.path}` (revision `{p.data.revision}`), prompt template `{p.prompt.template}`
- Method: {_method(p)}
- Training: {f"{p.train.max_steps} steps" if p.train.max_steps > 0 else f"{p.train.num_train_epochs} epochs"}, learning_rate={p.train.learning_rate},
  batch {p.train.per_device_train_batch_size} x {p.train.gradient_accumulation_steps}, seed {p.train.seed}

## Test-split {metric} ({scores['num_examples']} examples, {scoring})

| model | {metric} |
|---|---|
| base | {scores['base']:.4f} |
| {tuned} | {scores['adapter']:.4f} |
{last}

Full metrics with confidence intervals are in the pipeline's `metrics/eval.json`;
provenance (git commit, params hash, input hashes, library versions) in `manifest.json`.
"""


def _check(mismatch: float, limit: float, what: str) -> None:
    if mismatch > limit:
        raise PipelineError(f"{what}; nothing was saved")


def _gguf(folder: Path, merged, tokenizer, prompts: list[str], references: list[str],
          params: Params, scores: dict[str, Any]) -> dict[str, Any]:
    """Converts the saved model in `folder` to GGUF, reads it back and re-scores it."""
    outtype = params.export.gguf or ""
    if merged.config.model_type not in gguf.LOADABLE:
        raise PipelineError(f"export.gguf: transformers cannot read a {merged.config.model_type} "
                            f"model back from GGUF to check it (it reads {', '.join(gguf.LOADABLE)}); "
                            "set export.gguf: null")
    name = gguf.file_name(outtype)
    gguf.convert(folder, folder / name, outtype)
    model, gguf_tokenizer = gguf.load(folder, name)
    ours, theirs = input_ids(tokenizer, prompts, params), input_ids(gguf_tokenizer, prompts, params)
    differs = [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b]
    if differs:
        raise PipelineError(f"export.gguf: the GGUF file's tokenizer encodes test prompt {differs[0]} "
                            f"differently ({len(differs)} of {len(prompts)} prompts); nothing was saved")
    check = prompts[:params.export.check_prompts]
    diff = max(float((a - b).abs().max()) for a, b in zip(
        _logits(merged, tokenizer, check, params), _logits(model, tokenizer, check, params), strict=True))
    scores["gguf"] = _headline(model, tokenizer, prompts, references, params)
    _check(abs(scores["gguf"] - scores["merged"]), params.export.metric_atol,
           f"the GGUF file's {scores['metric']} {scores['gguf']} differs from the merged model's "
           f"{scores['merged']} by more than export.metric_atol = {params.export.metric_atol}")
    return {"file": name, "outtype": outtype, "bytes": (folder / name).stat().st_size,
            "logits_max_abs_diff": diff, "converter": gguf.source()}


def _save(model, tokenizer, params: Params, ws: Workspace, scores: dict[str, Any], extra=None) -> dict[str, Any]:
    """Writes artifacts/merged atomically; `extra(folder)` adds to it (GGUF) before the card."""
    written: dict[str, Any] = {}
    with atomic_path(ws.merged) as tmp:
        model.save_pretrained(tmp)
        if not (mergeable(params) or params.peft.full_finetune):  # a soft prompt's adapter
            normalize_adapter_config(tmp)
        save_tokenizer(tokenizer, tmp)
        if extra is not None:
            written = extra(tmp)
        (tmp / "README.md").write_text(model_card(params, scores), encoding="utf-8")
        lineage = {**manifest(params, ws), "merged": mergeable(params)}
        (tmp / "manifest.json").write_text(json.dumps(lineage, indent=2, sort_keys=True) + "\n")
    return written


def _generation_defaults(model, tokenizer, params: Params) -> None:
    """Greedy generation as evaluate scored it, for whoever loads the export."""
    if params.model.task != "sequence_classification":
        model.generation_config.update(
            max_new_tokens=params.evaluate.max_new_tokens, do_sample=False,
            eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)


def _same_model(before: list[Any], model, tokenizer, prompts: list[str], references: list[str],
                params: Params, scores: dict[str, Any], words: tuple[str, str, str, str]) -> float:
    """Checks that `model` (merged, or saved and read back) gives the logits `before` on the
    first export.check_prompts prompts and the tuned model's headline metric (scores["adapter"]),
    which it records as scores["merged"]; returns the largest logit difference. `words`: what
    differs, what that means, and the two models' names in the metric message."""
    cfg = params.export
    differs, meaning, ours, theirs = words
    after = _logits(model, tokenizer, prompts[:cfg.check_prompts], params)
    diff = max(float((a - b).abs().max()) for a, b in zip(before, after, strict=True))
    _check(diff, cfg.logits_atol, f"{differs} by {diff:.3g} (export.logits_atol = {cfg.logits_atol}): {meaning}")
    scores["merged"] = _headline(model, tokenizer, prompts, references, params)
    _check(abs(scores["merged"] - scores["adapter"]), cfg.metric_atol,
           f"{ours} {scores['metric']} {scores['merged']} differs from {theirs} "
           f"{scores['adapter']} by more than export.metric_atol = {cfg.metric_atol}")
    return diff


def _export_full(model, tokenizer, prompts: list[str], references: list[str], params: Params,
                 ws: Workspace, scores: dict[str, Any]) -> dict[str, Any]:
    """A full fine-tune has nothing to merge: `model` (train's, loaded in export.torch_dtype)
    is saved, and what was saved, loaded back, must give its logits and its headline metric
    (export.logits_atol, export.metric_atol) before the folder is moved into place."""
    import torch

    from tasks.modeling import load_standalone

    cfg = params.export
    before = _logits(model, tokenizer, prompts[:cfg.check_prompts], params)
    _generation_defaults(model, tokenizer, params)
    found: dict[str, Any] = {}

    def read_back(folder: Path) -> dict[str, Any]:
        saved = load_standalone(params, folder, getattr(torch, cfg.torch_dtype))[0]
        found["logits_max_abs_diff"] = _same_model(
            before, saved, tokenizer, prompts, references, params, scores,
            ("the saved model's logits, read back, differ from the fine-tuned model's",
             "saving lost something", "the saved model's", "the fine-tuned model's"))
        return _gguf(folder, saved, tokenizer, prompts, references, params, scores) if cfg.gguf else {}

    written = _save(model, tokenizer, params, ws, scores, read_back)
    metrics = {"merged": False, "full_finetune": True, **found, "scores": scores}
    if written:
        metrics["gguf"] = written
    write_json(ws.metrics("export"), metrics)
    log.info("fine-tuned model saved to %s: %s", ws.merged, metrics)
    return metrics


def run(params: Params, ws: Workspace) -> dict[str, Any]:
    import torch

    from tasks.modeling import load_standalone, load_tokenizer

    cfg = params.export
    if mergeable(params) or params.peft.full_finetune:
        from tasks.memory import export_preflight, shape
        from tasks.modeling import device, load_config

        export_preflight(params, shape(params, load_config(params)), ws.merged, device())
    adapter = tuned_adapter(params, ws)
    tokenizer = load_tokenizer(params.model, str(adapter))
    rows = test_rows(params, ws)
    prompts = [r["prompt"] for r in rows]
    references = [r["completion"].strip() for r in rows]
    base = _merge_base(params, tokenizer)
    base.eval()
    base_score = _headline(base, tokenizer, prompts, references, params)
    if params.peft.full_finetune:
        del base  # its weights make way for the tuned model's
        model = load_standalone(params, adapter, getattr(torch, cfg.torch_dtype))[0]
    else:
        model = attach_adapter(base, params, ws)
    # "adapter": the tuned model as train (or align) wrote it, by any method.
    scores = {"num_examples": len(rows), "metric": HEADLINE[params.model.task], "base": base_score,
              "adapter": _headline(model, tokenizer, prompts, references, params)}
    if params.peft.full_finetune:
        return _export_full(model, tokenizer, prompts, references, params, ws, scores)
    if not mergeable(params):
        log.warning("peft.method %s cannot be merged (virtual tokens, not weights): exporting "
                    "the adapter, to be loaded on %s", params.peft.method, params.model.name_or_path)
        _save(model, tokenizer, params, ws, scores)
        metrics = {"merged": False, "scores": scores}
        write_json(ws.metrics("export"), metrics)
        return metrics
    before = _logits(model, tokenizer, prompts[:cfg.check_prompts], params)
    merged = model.merge_and_unload()
    diff = _same_model(before, merged, tokenizer, prompts, references, params, scores,
                       ("merged logits differ from base + adapter", "the merge is wrong", "merged",
                        "the adapter's"))
    _generation_defaults(merged, tokenizer, params)
    extra = None
    if cfg.gguf:
        def extra(folder: Path) -> dict[str, Any]:
            return _gguf(folder, merged, tokenizer, prompts, references, params, scores)
    written = _save(merged, tokenizer, params, ws, scores, extra)
    metrics = {"merged": True, "logits_max_abs_diff": diff, "scores": scores}
    if written:
        metrics["gguf"] = written
    write_json(ws.metrics("export"), metrics)
    log.info("merged model saved to %s: %s", ws.merged, metrics)
    return metrics
