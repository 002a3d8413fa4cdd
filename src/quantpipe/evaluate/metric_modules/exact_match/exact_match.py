"""Exact match of generated answers against references, as an `evaluate` metric module.

Loaded by path, offline: `evaluate.load(".../metric_modules/exact_match")` (hub metrics need the
network; the `evaluate` package ships none). Both strings are stripped and their runs of
whitespace collapsed before comparing (a model's answer usually starts with a space or ends
with a newline); `ignore_case=True` also lowercases them. Returns {"exact_match": share in 0..1}.
"""
import datasets
import evaluate


def _normal(text: str, ignore_case: bool) -> str:
    text = " ".join(text.split())
    return text.lower() if ignore_case else text


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation="", inputs_description="predictions, references: "
            "lists of strings; ignore_case: bool (default False)",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references, ignore_case: bool = False):
        same = [_normal(p, ignore_case) == _normal(r, ignore_case)
                for p, r in zip(predictions, references)]
        return {"exact_match": sum(same) / max(len(same), 1)}
