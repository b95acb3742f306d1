"""Where each stage writes: the file contract of dvc.yaml, in one place."""

import os
from pathlib import Path

PREPARED = Path("data/prepared")  # {train,validation,test}.jsonl: {id, prompt, completion[, messages]}
TOKENIZED = Path("data/tokenized")  # save_to_disk DatasetDict {train, validation}
TOKENIZER = TOKENIZED / "tokenizer"  # the tokenizer every later stage loads (pad token fixed)
LABEL_PREVIEW = Path("reports/label_preview.txt")
ADAPTER = Path("artifacts/adapter")  # PEFT adapter (safetensors) + tokenizer
ALIGNED = Path("artifacts/aligned")  # DPO-tuned adapter (or a note when align is off)
CHECKPOINTS = Path("artifacts/checkpoints")  # resumable trainer checkpoints, not a DVC output
MERGED = Path("artifacts/merged")  # standalone model: safetensors, tokenizer, card, manifest
PREDICTIONS = Path("reports/predictions.jsonl")
EVAL_PREVIEW = Path("reports/eval_preview.md")
TRAIN_LOG = Path("metrics/train_log.tsv")
PROGRESS = Path("reports/progress.json")  # train's live position, for the Prefect flow; not a DVC output
TRACKERS = Path("logs")  # train.report_to's local files (tensorboard/, dvclive/); not DVC outputs
WORKSPACE_REGISTRY = Path("registry")  # dvc.yaml's (persistent, uncached) promote output
# Promoted models, one folder each; kept across runs. FINETUNE_REGISTRY moves it to storage
# that outlives the workspace: a remote worker's clone is thrown away after each run, and
# with it a registry inside it, so every night would meet no champion.
REGISTRY_ENV = "FINETUNE_REGISTRY"
REGISTRY = Path(os.environ.get(REGISTRY_ENV) or WORKSPACE_REGISTRY)
LATEST = REGISTRY / "latest.json"  # the promoted model consumers should read
METRICS = {stage: Path(f"metrics/{stage}.json")
           for stage in ("prepare", "tokenize", "train", "align", "eval", "lm_eval", "export", "promote")}
SPLITS = ("train", "validation", "test")
