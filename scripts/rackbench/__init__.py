"""rackbench: reproducible rack-scale LLM inference benchmarks.

All workflow logic lives in this package; the Snakemake rules call its entry
points (``python -m rackbench.<module> ...``) with explicit arguments, so every
step can also be run by hand.
"""

__version__ = "0.1.0"
