"""Where each stage reads and writes: the file contract of dvc.yaml, as one value.

A `Workspace` is built once, by the CLI or the Prefect flow, from the environment
(`Workspace.from_env()`), and passed to every stage's `run(params, ws)`. Nothing here reads
the current directory or the environment on import, so a test can run any stage in-process
on any workspace.

Paths in params.yaml (data.path, model.name_or_path, align.path, ...) are relative to the
workspace root, as dvc.yaml's are: a stage runs with the root as its working directory
(`Workspace.entered`, which the stage table uses), so those paths, dvc.lock and every message
read the same as under `dvc repro`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tasks.config.base import DATA_DIR, MODELS_DIR

# Promoted models, one folder each; kept across runs. FINETUNE_REGISTRY moves it to storage
# that outlives the workspace: a remote worker's clone is thrown away after each run, and
# with it a registry inside it, so every night would meet no champion.
REGISTRY_ENV = "FINETUNE_REGISTRY"
# Stages (comma-separated) this machine must not compute: the Prefect flow sets it while
# restoring a stage another worker ran (flows/finetune.py); `finetune <stage>` refuses them.
RESTORE_ONLY_ENV = "FINETUNE_RESTORE_ONLY"
SPLITS = ("train", "validation", "test")
# metrics/<name>.json: one per stage, plus evaluate's two (eval, lm_eval).
METRIC_FILES = ("prepare", "tokenize", "train", "align", "eval", "lm_eval", "export", "promote")


@dataclass(frozen=True)
class Workspace:
    root: Path = Path(".")
    # None: the workspace's own registry/ (dvc.yaml's persistent, uncached promote output).
    registry_dir: Path | None = field(default=None)

    @classmethod
    def from_env(cls, root: Path | str = ".") -> Workspace:
        moved = os.environ.get(REGISTRY_ENV)
        return cls(Path(root), Path(moved) if moved else None)

    def path(self, relative: str | Path) -> Path:
        return self.root / relative

    @contextlib.contextmanager
    def entered(self) -> Iterator[Workspace]:
        """The root as the working directory for the duration (params' paths are relative
        to it); the previous one is restored after."""
        previous = Path.cwd()
        os.chdir(self.root)
        try:
            yield self
        finally:
            os.chdir(previous)

    # Local inputs must live where dvc.yaml tracks them, or DVC could not notice they changed.
    @property
    def data_dir(self) -> Path:
        return self.root / DATA_DIR

    @property
    def models_dir(self) -> Path:
        return self.root / MODELS_DIR

    @property
    def params_file(self) -> Path:
        return self.root / "params.yaml"

    @property
    def prepared(self) -> Path:  # {train,validation,test}.jsonl: {id, prompt, completion[, messages]}
        return self.root / "data/prepared"

    @property
    def tokenized(self) -> Path:  # save_to_disk DatasetDict {train, validation}
        return self.root / "data/tokenized"

    @property
    def tokenizer(self) -> Path:  # the tokenizer every later stage loads (pad token fixed)
        return self.tokenized / "tokenizer"

    @property
    def label_preview(self) -> Path:
        return self.root / "reports/label_preview.txt"

    @property
    def adapter(self) -> Path:
        """train's output: the PEFT adapter (adapter_config.json, safetensors) + tokenizer; with
        full fine-tuning (peft.method none) the whole tuned model (config.json, safetensors) +
        tokenizer. Which of the two a folder holds is what its config file says."""
        return self.root / "artifacts/adapter"

    @property
    def aligned(self) -> Path:  # the align.method-tuned adapter (or a note when align is off)
        return self.root / "artifacts/aligned"

    @property
    def checkpoints(self) -> Path:  # resumable trainer checkpoints, not a DVC output
        return self.root / "artifacts/checkpoints"

    @property
    def merged(self) -> Path:  # standalone model: safetensors, tokenizer, card, manifest
        return self.root / "artifacts/merged"

    @property
    def predictions(self) -> Path:
        return self.root / "reports/predictions.jsonl"

    @property
    def eval_preview(self) -> Path:
        return self.root / "reports/eval_preview.md"

    @property
    def train_log(self) -> Path:
        return self.root / "metrics/train_log.tsv"

    @property
    def eval_log(self) -> Path:  # the validation losses alone: what dvc plots draws them from
        return self.root / "metrics/eval_log.tsv"

    @property
    def progress(self) -> Path:  # train's live position, for the Prefect flow; not a DVC output
        return self.root / "reports/progress.json"

    @property
    def trackers(self) -> Path:  # train.report_to's local files (tensorboard/, dvclive/); not DVC outputs
        return self.root / "logs"

    @property
    def workspace_registry(self) -> Path:  # dvc.yaml's promote output, created even when moved
        return self.root / "registry"

    @property
    def registry(self) -> Path:
        return self.registry_dir if self.registry_dir is not None else self.workspace_registry

    @property
    def latest(self) -> Path:  # the promoted model consumers should read
        return self.registry / "latest.json"

    @property
    def pending(self) -> Path:  # a promotion awaiting approval (promote.approval: required)
        return self.registry / "pending.json"

    def metrics(self, name: str) -> Path:
        if name not in METRIC_FILES:
            raise KeyError(f"no metrics file {name!r}; known: {', '.join(METRIC_FILES)}")
        return self.root / f"metrics/{name}.json"
