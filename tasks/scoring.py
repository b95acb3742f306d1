"""ROUGE scoring through the `evaluate` API, with bootstrap confidence intervals.

Used by the evaluate and export stages and by `finetune score`, so a user can check the
scorer against a published baseline's outputs:

    finetune score --predictions preds.txt --references refs.txt
    finetune score --predictions preds.jsonl --references refs.jsonl --field summary
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from tasks.errors import PipelineError

METRIC_DIR = Path(__file__).parent / "metrics" / "rouge"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@functools.cache
def rouge_metric():
    import evaluate

    return evaluate.load(str(METRIC_DIR))


def per_example(predictions: list[str], references: list[str], use_stemmer: bool) -> dict[str, list[float]]:
    if len(predictions) != len(references):
        raise PipelineError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise PipelineError("nothing to score: no predictions")
    return rouge_metric().compute(predictions=predictions, references=references,
                                  use_stemmer=use_stemmer, use_aggregator=False)


def summarize(scores: dict[str, list[float]], bootstrap_samples: int, confidence_level: float,
              seed: int) -> dict[str, Any]:
    """Mean F-measure per ROUGE type with a percentile bootstrap confidence interval."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = len(next(iter(scores.values())))
    resample = rng.integers(0, n, size=(bootstrap_samples, n))
    tail = (1 - confidence_level) / 2 * 100
    out: dict[str, Any] = {"num_examples": n}
    for name, values in scores.items():
        v = np.asarray(values)
        means = v[resample].mean(axis=1)
        out[name] = {"mean": round(float(v.mean()), 6),
                     "ci_low": round(float(np.percentile(means, tail)), 6),
                     "ci_high": round(float(np.percentile(means, 100 - tail)), 6)}
    return out


def score(predictions: list[str], references: list[str], *, use_stemmer: bool = True,
          bootstrap_samples: int = 1000, confidence_level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    return summarize(per_example(predictions, references, use_stemmer), bootstrap_samples,
                     confidence_level, seed)


def read_texts(path: Path, field: str | None) -> list[str]:
    """One text per line of a .txt file, or the `field` of each line of a .jsonl file."""
    if not path.is_file():
        raise PipelineError(f"{path}: file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise PipelineError(f"{path}: not UTF-8 text (byte {err.start})") from None
    if path.suffix != ".jsonl":
        return lines
    if not field:
        raise PipelineError(f"{path}: a .jsonl file needs --field NAME (the key holding the text)")
    texts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)[field]
        except (json.JSONDecodeError, TypeError) as err:
            raise PipelineError(f"{path} line {number}: not a JSON object ({err})") from None
        except KeyError:
            raise PipelineError(f"{path} line {number}: no field {field!r}") from None
        if not isinstance(value, str):
            raise PipelineError(f"{path} line {number}: field {field!r} is not text")
        texts.append(value)
    return texts
