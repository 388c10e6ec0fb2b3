"""MLPerf Inference benchmark names and their accuracy targets: the one place rackbench keeps them.

Transcribed from MLCommons' submission checker (mlcommons/inference at b66003e,
``tools/submission/submission_checker/constants.py``, ``MODEL_CONFIG[<round>]``:
``models``, ``accuracy-target``, ``accuracy-upper-limit``, ``dataset-size``) and
``language/llama2-70b/README.md`` ("Accuracy Target"). A contract test
(tests/test_benchmarks.py) reads the checker's constants from the checkout and
compares them with these.

* MLPerf v6.1 dropped ``llama2-70b-99``: its model list has only ``llama2-70b-99.9``.
  rackbench targets ``llama2-70b-99.9`` by default; ``llama2-70b-99`` stays selectable
  (it is a v6.0 benchmark: NVIDIA's GB300 NVL72 x72 record is one).
* Both score ROUGE against the fp32 reference 44.4312 / 22.0352 / 28.6162
  (rouge1 / rouge2 / rougeL), at 0.999 (-99.9) or 0.99 (-99) of it, and require
  tokens/sample within 294.45 x (1 +- 0.1).
* The Server and Interactive scenarios use LoadGen's own settings from its built-in
  mlperf.conf: ``llama2-70b`` (Server TTFT 2 s, TPOT 200 ms) and
  ``llama2-70b-interactive`` (TTFT 450 ms, TPOT 40 ms).
"""

from __future__ import annotations

from dataclasses import dataclass, field

CURRENT_ROUND = "v6.1"
DEFAULT_BENCHMARK = "llama2-70b-99.9"
LLAMA2_REFERENCE = {"rouge1": 44.4312, "rouge2": 22.0352, "rougeL": 28.6162, "tokens_per_sample": 294.45}
LLAMA2_TOKENS_TOLERANCE = 0.1
LLAMA2_DATASET_SIZE = 24576
# LoadGen's mlperf.conf model keys (loadgen/mlperf.conf: llama2-70b.*, llama2-70b-interactive.*)
LOADGEN_MODEL = {"Offline": "llama2-70b", "Server": "llama2-70b", "Interactive": "llama2-70b-interactive"}
# LoadGen has no Interactive scenario: it runs as Server with the interactive key's latencies
LOADGEN_SCENARIO = {"Offline": "Offline", "Server": "Server", "Interactive": "Server"}
SCENARIOS = tuple(LOADGEN_MODEL)


@dataclass(frozen=True)
class Benchmark:
    name: str
    reference: dict
    target_fraction: float
    tokens_per_sample_tolerance: float
    rounds: tuple[str, ...]  # the rounds whose checker knows this name
    dataset_size: int
    scenarios_datacenter_required: tuple[str, ...]
    # the checker also requires one of these for a datacenter system (loader.py check_scenarios)
    scenarios_datacenter_one_of: tuple[str, ...] = field(default=())

    def targets(self) -> dict:
        """What the checker requires of the printed values: ROUGE minima and the tokens/sample range."""
        out = {k: self.reference[k] * self.target_fraction for k in ("rouge1", "rouge2", "rougeL")}
        tps = self.reference["tokens_per_sample"]
        out["tokens_per_sample"] = [
            tps * (1 - self.tokens_per_sample_tolerance),
            tps * (1 + self.tokens_per_sample_tolerance),
        ]
        return out

    def describe(self) -> str:
        ref = self.reference
        return (
            f"{self.name}: ROUGE-1/2/L >= {self.target_fraction} x {ref['rouge1']} / {ref['rouge2']} / "
            f"{ref['rougeL']}, tokens/sample {ref['tokens_per_sample']} +-{self.tokens_per_sample_tolerance:.0%}"
        )


BENCHMARKS = {
    "llama2-70b-99.9": Benchmark(
        "llama2-70b-99.9",
        LLAMA2_REFERENCE,
        0.999,
        LLAMA2_TOKENS_TOLERANCE,
        ("v6.0", "v6.1"),
        LLAMA2_DATASET_SIZE,
        ("Offline",),
        ("Server", "Interactive"),
    ),
    "llama2-70b-99": Benchmark(
        "llama2-70b-99",
        LLAMA2_REFERENCE,
        0.99,
        LLAMA2_TOKENS_TOLERANCE,
        ("v6.0",),
        LLAMA2_DATASET_SIZE,
        ("Offline",),
        ("Server", "Interactive"),
    ),
}


class BenchmarkError(ValueError):
    pass


def get(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise BenchmarkError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}") from None


def round_for(name: str) -> str:
    """The newest round whose submission checker accepts this benchmark name."""
    rounds = get(name).rounds
    return CURRENT_ROUND if CURRENT_ROUND in rounds else rounds[-1]


def gate(accuracy_config: dict) -> dict:
    """The accuracy gate of one model: reference, target fraction, tolerance and the target's name.

    ``accuracy_config`` is a model's ``accuracy`` block: either ``{benchmark: NAME}``
    (an MLPerf benchmark of this table) or a custom ``{reference, target_fraction,
    tokens_per_sample_tolerance}`` (the demo's tiny model, which has its own reference).
    """
    name = accuracy_config.get("benchmark")
    if name:
        bench = get(name)
        if accuracy_config.get("reference") is not None or accuracy_config.get("target_fraction") is not None:
            raise BenchmarkError(
                f"accuracy names benchmark {name!r}; its reference and target come from "
                "rackbench.benchmarks, so do not also give reference/target_fraction"
            )
        return {
            "target_name": name,
            "reference": dict(bench.reference),
            "target_fraction": bench.target_fraction,
            "tokens_per_sample_tolerance": bench.tokens_per_sample_tolerance,
            "description": bench.describe(),
        }
    missing = [k for k in ("reference", "target_fraction") if accuracy_config.get(k) is None]
    if missing:
        raise BenchmarkError(f"accuracy needs either `benchmark` or {' and '.join(missing)}")
    tol = accuracy_config.get("tokens_per_sample_tolerance", LLAMA2_TOKENS_TOLERANCE)
    ref = accuracy_config["reference"]
    fraction = accuracy_config["target_fraction"]
    return {
        "target_name": f"custom (x{fraction} of the configured reference)",
        "reference": dict(ref),
        "target_fraction": fraction,
        "tokens_per_sample_tolerance": tol,
        "description": f"custom: ROUGE-1/2/L >= {fraction} x {ref.get('rouge1')} / {ref.get('rouge2')} / "
        f"{ref.get('rougeL')}, tokens/sample {ref.get('tokens_per_sample')} +-{tol:.0%}",
    }
