"""What every section shares: the base model, the folders dvc.yaml tracks, the data formats."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

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


# The base of every section. extra="forbid": a typo fails at once, naming its key path, instead
# of being ignored; frozen: no stage can change the params it was given (and hashed); no
# NaN or infinity, which no setting means and JSON cannot hold.
class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# Tags of a union's members start with this; messages leave them out of the key path, so a
# problem in split files reads `data.path.train`, with no report on the other shapes.
TAG = "as-"
