"""predict: run a tuned model on new data, outside the DVC graph (a rerun on this week's data
is not a pipeline output).

The input is read as prepare reads data (any format it takes, data.columns and data.delimiter
apply) and each record is rendered with the run's prompt template; the completion's fields
need not be there. The model is a PEFT adapter folder (loaded on the base as evaluate does),
an exported merged model, a full fine-tune's artifacts/adapter (a whole model: peft.method
none), or `registry/latest` (the promoted one). Prompts are batched as in
evaluate. Writes JSONL rows {id, prompt, prediction} ({id, prompt, class, probabilities} for
sequence_classification), plus `references` with --references FIELD, which also scores them
as evaluate does.

    finetune predict --input data/raw/week48.tsv --model artifacts/adapter --output preds.jsonl
    finetune predict --input data/raw/test.jsonl --model registry/latest --output preds.jsonl \\
        --references summary
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tasks import registry, templates
from tasks.config import LOCAL_DATA_SUFFIXES, Params, data_suffix, path_kind
from tasks.errors import DataError, PipelineError, TemplateError
from tasks.io import atomic_path, check_adapter, write_jsonl
from tasks.workspace import Workspace

log = logging.getLogger("finetune.predict")

# What --model accepts for the promoted model (registry/latest.json names its folder); the
# same name when FINETUNE_REGISTRY moved the registry, or that registry's own latest.
LATEST = Path("registry/latest")


def resolve_model(ref: str, ws: Workspace) -> tuple[Path, bool]:
    """(folder, whether it is an adapter) of --model."""
    folder = Path(ref)
    if folder in (LATEST, ws.path(LATEST), ws.latest.with_suffix("")):
        pointer = registry.latest(ws)
        if pointer is None:
            raise PipelineError(f"--model {ref}: no model was promoted yet ({ws.latest} is missing); "
                                "name an adapter (artifacts/adapter) or an export (artifacts/merged)")
        folder = Path(pointer["path"])
    if not folder.is_dir():
        raise PipelineError(f"--model: {folder} is not a folder (an adapter, an exported model or "
                            f"{LATEST})")
    if (folder / "adapter_config.json").is_file():
        return check_adapter(folder, _recovery(folder, ws)), True
    if (folder / "config.json").is_file():
        return folder, False
    raise PipelineError(f"--model: {folder} holds neither an adapter (adapter_config.json) nor a "
                        "model (config.json)")


def _recovery(folder: Path, ws: Workspace) -> str:
    """How to get a good copy of the adapter `folder`: the stage that writes it, else a backup."""
    if folder.resolve().parent == ws.registry.resolve():
        return registry.restore(folder)
    written = {ws.adapter: "train", ws.aligned: "align", ws.merged: "export"}
    stage = next((s for f, s in written.items() if f.resolve() == folder.resolve()), None)
    return f"rerun `dvc repro {stage}`" if stage else "save the adapter again, or restore it from a backup"


def load_model(params: Params, ws: Workspace, folder: Path, adapter: bool):
    if adapter:
        from tasks.generation import attach_adapter, load_base_and_tokenizer

        base, tokenizer = load_base_and_tokenizer(params, ws, folder)
        return attach_adapter(base, params, ws, folder), tokenizer
    import torch

    from tasks.modeling import load_standalone

    # An export (or a full fine-tune's artifacts/adapter) is a standalone model, loaded in the
    # dtype an export is saved in.
    return load_standalone(params, folder, getattr(torch, params.export.torch_dtype))


def _chat_prompt(messages: Any, tokenizer: Any, where: str) -> str:
    """A chat's prompt: all of it, or all but a final assistant answer (its reference)."""
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
            and messages[-1].get("role") == "assistant":
        return templates.render_chat(messages, tokenizer, where)[0]
    if not isinstance(messages, list) or not messages:
        raise TemplateError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def read_inputs(params: Params, path: Path, references: str | None, tokenizer: Any) -> list[dict[str, Any]]:
    """{id, prompt[, references]} per record of `path`; a bad record stops with its line."""
    from tasks.records import BadRecord, label_name, prompt_values, read_file, reference_texts

    kind = path_kind(path)
    if kind is None:
        raise DataError(f"--input: {path} does not exist")
    if kind != "a file":  # a FIFO would block the read forever
        raise DataError(f"--input: {path} is {kind}, not a data file: name a regular file")
    if data_suffix(str(path)) is None:
        raise DataError(f"--input: {path} is not a format prepare reads ({', '.join(LOCAL_DATA_SUFFIXES)})")
    chat = params.prompt.template == templates.CHAT
    tpl = None if chat else templates.resolve(params.prompt.template, params.prompt.completion)
    names = ["messages"] if tpl is None else templates.prompt_fields(tpl)
    id_column = params.data.id_column
    rows = []
    for number, (where, record, bad) in enumerate(read_file(path, params.data)):
        try:
            if bad is not None:
                raise BadRecord(*bad.split(": ", 1))
            assert record is not None
            values = prompt_values(params, record, where, names)
            prompt = _chat_prompt(values["messages"], tokenizer, where) if tpl is None \
                else templates.render_prompt(tpl, values, where)
            row: dict[str, Any] = {"id": str(record[id_column]) if id_column and record.get(id_column) is not None
                                   else f"row{number}", "prompt": prompt}
            if references:
                value = record.get(references)
                if params.model.labels is not None and type(value) is int:
                    value = str(value)  # an integer-coded label: an index into model.labels
                refs = reference_texts(value)
                if refs is None:
                    raise BadRecord("missing_field", f"{where}: reference field {references!r} is "
                                    "missing or not text (nor a list of texts)")
                if params.model.labels is not None:
                    refs = [label_name(params.model.labels, r.strip(), where) for r in refs]
                row["references"] = [r.strip() for r in refs]
        except (BadRecord, TemplateError) as err:
            message = str(err) if isinstance(err, TemplateError) else err.args[-1]
            raise DataError(message if message.startswith(where) else f"{where}: {message}") from None
        rows.append(row)
    if not rows:
        raise DataError(f"--input: {path} has no records")
    return rows


def run(params: Params, ws: Workspace, input: Path, model_ref: str, output: Path,
        references: str | None = None) -> dict[str, Any]:
    from tasks.scoring import scores
    from tasks.generation import class_probabilities, generate, most_likely
    from tasks.modeling import load_tokenizer

    if output.suffix != ".jsonl":
        raise PipelineError(f"--output: {output} must end in .jsonl")
    folder, adapter = resolve_model(model_ref, ws)
    # The chat template renders prompts before the model loads: a bad input fails fast.
    tokenizer = load_tokenizer(params.model, str(folder)) if params.prompt.template == templates.CHAT else None
    rows = read_inputs(params, input, references, tokenizer)
    model, tokenizer = load_model(params, ws, folder, adapter)
    prompts = [r["prompt"] for r in rows]
    log.info("predicting %d rows of %s with %s", len(rows), input, folder)
    labels = params.model.labels
    if labels is not None:
        probabilities = class_probabilities(model, tokenizer, prompts, params)
        predictions = most_likely(labels, probabilities)
        out = [{"id": r["id"], "prompt": r["prompt"], "class": c,
                "probabilities": {name: round(v, 6) for name, v in zip(labels, p, strict=True)}}
               for r, c, p in zip(rows, predictions, probabilities, strict=True)]
    else:
        predictions = generate(model, tokenizer, prompts, params)
        out = [{"id": r["id"], "prompt": r["prompt"], "prediction": p} for r, p in zip(rows, predictions, strict=True)]
    for row, r in zip(out, rows, strict=True):
        if "references" in r:
            row["references"] = r["references"]
    with atomic_path(output) as tmp:
        write_jsonl(tmp, out)
    result: dict[str, Any] = {"rows": len(out), "output": str(output), "model": str(folder)}
    if references:
        result["scores"] = scores(predictions, [r["references"] for r in rows], params)
    return result
