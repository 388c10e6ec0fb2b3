"""FAKE: a stand-in for the Hugging Face ``evaluate`` metric ``rouge`` (a rackbench test fake).

Why it exists: MLCommons' ``language/llama2-70b/evaluate-accuracy.py`` calls
``evaluate.load("rouge")``. The ``evaluate`` wheel on PyPI ships no metric scripts; the
``rouge`` script is fetched from the Hugging Face Hub (space ``evaluate-metric/rouge``),
which this machine and CI cannot reach, so ``evaluate.load("rouge")`` fails with
"Couldn't find a module script at .../rouge/rouge.py. Module 'rouge' doesn't exist on the
Hugging Face Hub either." ``evaluate.load`` looks for ``./rouge/rouge.py`` first, so the
test puts this folder there. Written for rackbench against evaluate's documented Metric
interface (not a copy of the Hub script): per-pair ``rouge_score`` F-measures, as that
metric returns them with ``use_aggregator=False``, which is how evaluate-accuracy.py calls it.
"""

import datasets
import evaluate
from rouge_score import rouge_scorer


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="FAKE rouge metric for offline tests (rouge_score F-measures)",
            citation="",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, rouge_types=None, use_aggregator=True, use_stemmer=False):
        if use_aggregator:
            raise NotImplementedError("this fake supports only use_aggregator=False (what evaluate-accuracy.py uses)")
        rouge_types = rouge_types or ["rouge1", "rouge2", "rougeL", "rougeLsum"]
        scorer = rouge_scorer.RougeScorer(rouge_types=rouge_types, use_stemmer=use_stemmer)
        scores = [scorer.score(ref, pred) for ref, pred in zip(references, predictions)]
        return {key: [s[key].fmeasure for s in scores] for key in rouge_types}
