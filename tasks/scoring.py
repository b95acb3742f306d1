"""Scoring with bootstrap confidence intervals: ROUGE through the `evaluate` API for the
generative tasks, accuracy and macro-F1 for sequence_classification.

Used by the evaluate and export stages and by `finetune score`, so a user can check the
scorer against a published baseline's outputs:

    finetune score --predictions preds.txt --references refs.txt
    finetune score --predictions preds.jsonl --references refs.jsonl --field summary
    finetune score --predictions preds.txt --references refs1.txt refs2.txt refs3.txt
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from tasks.config import Params
from tasks.errors import PipelineError

METRIC_DIR = Path(__file__).parent / "metrics" / "rouge"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
CLASSIFICATION_METRICS = ("accuracy", "f1_macro")
# The number promote gates on and export checks after merging, per model.task.
HEADLINE = {"causal_lm": "rougeL", "seq2seq": "rougeL", "sequence_classification": "accuracy"}
# reports/predictions.jsonl's per-row HEADLINE score of each column (against `reference`).
SCORE_FIELDS = {"base": "base_score", "tuned": "tuned_score"}


def metric_names(task: str) -> tuple[str, ...]:
    return CLASSIFICATION_METRICS if task == "sequence_classification" else ROUGE_TYPES


@functools.cache
def rouge_metric():
    return _evaluate_package().load(str(METRIC_DIR))


def _evaluate_package():
    """The `evaluate` package, imported without torch where torch is not loaded yet. Its
    model-evaluator module (pipelines; unused here) imports transformers.pipelines, and so
    torch, when the package is imported, and does without it when that import fails: marked
    unavailable for the length of the import, it costs `finetune score` and promote no torch."""
    import sys

    if "evaluate" in sys.modules or "transformers.pipelines" in sys.modules:
        import evaluate

        return evaluate
    sys.modules["transformers.pipelines"] = None  # type: ignore[assignment]  # import -> ImportError
    try:
        import evaluate
    finally:
        del sys.modules["transformers.pipelines"]
    return evaluate


# One reference text per prediction, or several (each prediction then scores against its best).
References = list[str] | list[list[str]]


def per_example(predictions: list[str], references: References, use_stemmer: bool) -> dict[str, list[float]]:
    if len(predictions) != len(references):
        raise PipelineError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise PipelineError("nothing to score: no predictions")
    return rouge_metric().compute(predictions=predictions, references=references,
                                  use_stemmer=use_stemmer, use_aggregator=False)


def headline_per_example(predictions: list[str], references: list[str], task: str,
                         use_stemmer: bool) -> list[float]:
    """Each example's share of the task's HEADLINE metric: its ROUGE-L F-measure, or 1/0 for
    a right/wrong class (whose mean is the accuracy)."""
    if task != "sequence_classification":
        return per_example(predictions, references, use_stemmer)[HEADLINE[task]]
    if len(predictions) != len(references):
        raise PipelineError(f"{len(predictions)} predictions but {len(references)} references")
    return [float(p == r) for p, r in zip(predictions, references, strict=True)]


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


def _classification(pred: Any, ref: Any, num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 (over the classes that occur in `ref` or `pred`, as
    scikit-learn's f1_score(average="macro") counts them)."""
    import numpy as np

    hits = np.bincount(ref[pred == ref], minlength=num_labels)
    predicted, actual = np.bincount(pred, minlength=num_labels), np.bincount(ref, minlength=num_labels)
    present = predicted + actual > 0
    f1 = 2 * hits[present] / (predicted + actual)[present]
    return {"accuracy": float((pred == ref).mean()), "f1_macro": float(f1.mean())}


def classification(predictions: list[str], references: list[str], labels: list[str],
                   bootstrap_samples: int, confidence_level: float, seed: int) -> dict[str, Any]:
    """Accuracy and macro-F1 with percentile bootstrap intervals, and the confusion counts."""
    import numpy as np

    if len(predictions) != len(references):
        raise PipelineError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise PipelineError("nothing to score: no predictions")
    pred = np.array([labels.index(p) for p in predictions])
    ref = np.array([labels.index(r) for r in references])
    rng = np.random.default_rng(seed)
    resamples = [_classification(pred[i], ref[i], len(labels))
                 for i in rng.integers(0, len(pred), size=(bootstrap_samples, len(pred)))]
    tail = (1 - confidence_level) / 2 * 100
    point = _classification(pred, ref, len(labels))
    out: dict[str, Any] = {"num_examples": len(pred)}
    for name in CLASSIFICATION_METRICS:
        values = [r[name] for r in resamples]
        out[name] = {"mean": round(point[name], 6),
                     "ci_low": round(float(np.percentile(values, tail)), 6),
                     "ci_high": round(float(np.percentile(values, 100 - tail)), 6)}
    out["confusion"] = {t: {p: int(((ref == i) & (pred == j)).sum()) for j, p in enumerate(labels)}
                        for i, t in enumerate(labels)}
    return out


def score(predictions: list[str], references: References, *, use_stemmer: bool = True,
          bootstrap_samples: int = 1000, confidence_level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    return summarize(per_example(predictions, references, use_stemmer), bootstrap_samples,
                     confidence_level, seed)


def read_texts(path: Path, field: str | None) -> list[str | list[str]]:
    """One text per line of a .txt file, or the `field` of each line of a .jsonl file (a
    text, or a list of texts: several references)."""
    if not path.is_file():
        raise PipelineError(f"{path}: file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise PipelineError(f"{path}: not UTF-8 text (byte {err.start})") from None
    if path.suffix != ".jsonl":
        return list(lines)
    if not field:
        raise PipelineError(f"{path}: a .jsonl file needs --field NAME (the key holding the text)")
    texts: list[str | list[str]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)[field]
        except (json.JSONDecodeError, TypeError) as err:
            raise PipelineError(f"{path} line {number}: not a JSON object ({err})") from None
        except KeyError:
            raise PipelineError(f"{path} line {number}: no field {field!r}") from None
        if not (isinstance(value, str) or isinstance(value, list) and value
                and all(isinstance(v, str) for v in value)):
            raise PipelineError(f"{path} line {number}: field {field!r} is neither text nor a list of texts")
        texts.append(value)
    return texts


def read_predictions(path: Path, field: str | None) -> list[str]:
    texts = read_texts(path, field)
    if any(isinstance(t, list) for t in texts):
        raise PipelineError(f"{path}: field {field!r} holds lists; a prediction is one text")
    return [t for t in texts if isinstance(t, str)]


def read_references(files: list[Path], field: str | None) -> References:
    """Each prediction's references: one per file (or a list from a JSONL field), side by side."""
    columns = [read_texts(f, field) for f in files]
    if len(columns) == 1 and all(isinstance(t, str) for t in columns[0]):
        return [t for t in columns[0] if isinstance(t, str)]
    if len({len(c) for c in columns}) > 1:
        raise PipelineError("the --references files differ in length: "
                            + ", ".join(f"{f} has {len(c)}" for f, c in zip(files, columns, strict=True)))
    return [[t for cell in row for t in ([cell] if isinstance(cell, str) else cell)]
            for row in zip(*columns, strict=True)]


def scores(predictions: list[str], references: References, params: Params) -> dict[str, Any]:
    """The task's metrics (ROUGE, or accuracy and macro-F1), each with its bootstrap CI."""
    cfg = params.evaluate
    if params.model.task == "sequence_classification":
        return classification(predictions, [r if isinstance(r, str) else r[0] for r in references],
                              params.model.labels or [], cfg.bootstrap_samples, cfg.confidence_level, cfg.seed)
    return summarize(per_example(predictions, references, cfg.use_stemmer),
                     cfg.bootstrap_samples, cfg.confidence_level, cfg.seed)
