"""The model registry: promoted models, one folder each, and `latest.json` pointing at the
current champion. Each entry keeps the test predictions it was last scored with, their
per-row headline scores, and what they were made on (`scored.json`), so the next promote can
reuse them instead of loading the model again.

promote writes it; predict (`--model registry/latest`) reads it. The registry is
`registry/` in the workspace unless FINETUNE_REGISTRY names another folder
(tasks/workspace.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tasks.config import Params
from tasks.errors import PipelineError
from tasks.io import atomic_path, check_adapter, damaged, read_json_state, read_jsonl, write_json, write_jsonl
from tasks.scoring import HEADLINE
from tasks.workspace import Workspace

# Files a registry entry holds beside the model.
ENTRY_PREDICTIONS = "predictions.jsonl"  # {id, prompt, reference, prediction, score} per test row
ENTRY_SCORED = "scored.json"  # what those predictions were made on: test_sha256, generation, scoring
ENTRY_DECISION = "promotion.json"  # the decision that promoted it


def latest(ws: Workspace) -> dict[str, Any] | None:
    """What `registry/latest.json` points at now, if anything was ever promoted."""
    if not ws.latest.is_file():
        return None
    return read_json_state(ws.latest, required={"path": str}, recover=(
        "restore it from a backup, or delete it to start over (the next promote compares with "
        "the base model)"))


def servable(model: str | None, ws: Workspace) -> Path:
    """The model folder `finetune serve` serves: `model`, or the champion's."""
    if model is None:
        entry = latest(ws)
        if entry is None:
            raise PipelineError(f"nothing to serve: {ws.latest} names no champion yet (run promote), "
                                "or give --model a model folder, e.g. artifacts/merged")
        folder = Path(entry["path"])
    else:
        folder = Path(model)
    if not (folder / "config.json").is_file():
        raise PipelineError(f"{folder} is not a saved model (no config.json): give --model a folder "
                            "export wrote (artifacts/merged) or a registry entry; an adapter folder "
                            "needs `finetune export` first")
    return folder.resolve()


def restore(entry: Path) -> str:
    """How to recover from a damaged registry entry."""
    return f"restore {entry} from a backup, or delete {entry.parent / 'latest.json'} to start over"


def test_digest(rows: list[dict[str, Any]]) -> str:
    """sha256 of the scored test rows (ids, prompts, references, in order)."""
    key = [[r["id"], r["prompt"], r["reference"]] for r in rows]
    return hashlib.sha256(json.dumps(key, ensure_ascii=False).encode()).hexdigest()


def generation_settings(params: Params) -> dict[str, Any]:
    """The settings besides the model and rows that decide what a model answers."""
    return {"task": params.model.task, "max_new_tokens": params.evaluate.max_new_tokens,
            "max_length": params.tokenize.max_length, "labels": params.model.labels}


def scoring_settings(params: Params) -> dict[str, Any]:
    """The settings that decide a stored answer's score."""
    return {"metric": HEADLINE[params.model.task], "use_stemmer": params.evaluate.use_stemmer}


def store(entry: Path, rows: list[dict[str, Any]], predictions: list[str], scores: list[float],
          params: Params) -> None:
    """Writes a model's test predictions and their scores into its registry entry; scored.json
    last, so it only ever describes a complete predictions file."""
    with atomic_path(entry / ENTRY_PREDICTIONS) as tmp:
        write_jsonl(tmp, [{"id": r["id"], "prompt": r["prompt"], "reference": r["reference"],
                           "prediction": p, "score": s}
                          for r, p, s in zip(rows, predictions, scores, strict=True)])
    write_json(entry / ENTRY_SCORED, {"test_sha256": test_digest(rows),
                                      "generation": generation_settings(params),
                                      "scoring": scoring_settings(params)})


def stored(entry: Path, rows: list[dict[str, Any]],
           params: Params) -> tuple[list[str] | None, list[float] | None, str]:
    """An entry's stored answers on `rows` when made on the same rows and settings (else None),
    their scores when scored the same way (else None), and why not when not reused."""
    scored_file = entry / ENTRY_SCORED
    if not scored_file.is_file():
        return None, None, "it has no stored predictions"
    # Without scored.json promote generates the champion's answers again, and stores them.
    recover = f"delete {scored_file} to have promote generate the champion's answers again, or {restore(entry)}"
    scored = read_json_state(scored_file, required={"test_sha256": str, "generation": dict}, recover=recover)
    digest = test_digest(rows)
    if scored["test_sha256"] != digest:
        return None, None, (f"the test set changed since it was scored (sha256 {scored['test_sha256'][:12]} "
                            f"-> {digest[:12]})")
    if scored["generation"] != generation_settings(params):
        return None, None, "the generation settings changed since it was scored"
    kept = read_jsonl(entry / ENTRY_PREDICTIONS, required={"prediction": str}, recover=recover)
    if len(kept) != len(rows):
        raise damaged(entry / ENTRY_PREDICTIONS, f"{len(kept)} rows where {scored_file}'s test set has "
                      f"{len(rows)}", recover)
    predictions = [r["prediction"] for r in kept]
    same_scoring = scored.get("scoring") == scoring_settings(params) and all("score" in r for r in kept)
    return predictions, [r["score"] for r in kept] if same_scoring else None, "reused"


def load(entry: Path, params: Params):
    """A registry entry's model and tokenizer: a standalone model, or an adapter export
    (PEFT methods that do not merge) loaded on the configured base."""
    from tasks.modeling import load_tokenizer, model_class

    adapter = (entry / "adapter_config.json").is_file()
    if adapter:
        check_adapter(entry, restore(entry))
    tokenizer = load_tokenizer(params.model, str(entry))
    if adapter:
        from peft import PeftModel

        from tasks.modeling import load_base, match_vocab

        base = load_base(params, quantized=params.quant.load_in_4bit)
        match_vocab(base, tokenizer)
        model = PeftModel.from_pretrained(base, str(entry))
    else:
        model = model_class(params.model.task).from_pretrained(str(entry))
    model.eval()
    return model, tokenizer
