"""Where each stage writes: the file contract of dvc.yaml, in one place."""

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
REGISTRY = Path("registry")  # promoted models, one folder each; kept across runs
LATEST = REGISTRY / "latest.json"  # the promoted model consumers should read
METRICS = {stage: Path(f"metrics/{stage}.json")
           for stage in ("prepare", "tokenize", "train", "align", "eval", "lm_eval", "export", "promote")}
SPLITS = ("train", "validation", "test")
