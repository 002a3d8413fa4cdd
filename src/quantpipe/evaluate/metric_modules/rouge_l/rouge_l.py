"""ROUGE-L (longest common subsequence F-measure) of generated answers against references, as an
`evaluate` metric module scored by Google's `rouge_score` package (the implementation of
ROUGE-1.5.5 the hub's rouge metric wraps too).

Loaded by path, offline: `evaluate.load(".../metric_modules/rouge_l")`. rouge_score lowercases
and keeps only alphanumeric tokens; `use_stemmer=True` adds Porter stemming. Returns
{"rougeL": mean F-measure in 0..1}.
"""
import datasets
import evaluate
from rouge_score import rouge_scorer


class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation="", inputs_description="predictions, references: "
            "lists of strings; use_stemmer: bool (default False)",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references, use_stemmer: bool = False):
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
        scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
        return {"rougeL": sum(scores) / max(len(scores), 1)}
