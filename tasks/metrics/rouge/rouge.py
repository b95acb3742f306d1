"""ROUGE for the `evaluate` library, offline.

`evaluate.load("rouge")` fetches its script from the Hugging Face Hub at run time; this module
is loaded from a local path instead (`evaluate.load("tasks/metrics/rouge")`) and computes the
same thing with `rouge_score`: per-example F-measures, optionally averaged.
"""

import datasets
import evaluate
from rouge_score import rouge_scorer, scoring

_CITATION = """Lin, Chin-Yew. ROUGE: a package for automatic evaluation of summaries. 2004."""
_DESCRIPTION = """ROUGE-1/2/L/Lsum F-measure computed with Google's rouge_score package."""
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated texts.
    references: list of reference texts, one per prediction; or a list of lists of texts
        (several references per prediction: each prediction is scored against its best
        reference per ROUGE type, as rouge_score's score_multi does).
    rouge_types: which scores (default rouge1, rouge2, rougeL, rougeLsum).
    use_stemmer: Porter-stem words before matching (default True).
    use_aggregator: return the mean over examples (True) or per-example lists (False).
"""

DEFAULT_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[datasets.Features({"predictions": datasets.Value("string"),
                                         "references": datasets.Sequence(datasets.Value("string"))}),
                      datasets.Features({"predictions": datasets.Value("string"),
                                         "references": datasets.Value("string")})],
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(self, predictions, references, rouge_types=DEFAULT_TYPES, use_stemmer=True,
                 use_aggregator=True):
        scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
        per_example = {t: [] for t in rouge_types}
        for prediction, reference in zip(predictions, references):
            scores = scorer.score_multi(reference, prediction) if isinstance(reference, list) \
                else scorer.score(reference, prediction)
            for t in rouge_types:
                per_example[t].append(scores[t].fmeasure)
        if not use_aggregator:
            return per_example
        n = max(len(predictions), 1)
        return {t: sum(v) / n for t, v in per_example.items()}


__all__ = ["Rouge", "scoring"]
