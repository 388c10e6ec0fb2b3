"""Which dataset samples each shard runs.

``split``: the shards partition the dataset (contiguous, sizes differ by at most one).
``replicate``: every shard runs the whole dataset, as Azure's 18 per-node runs did.
Accuracy runs always use ``split`` so that every sample is scored exactly once.
"""

from __future__ import annotations

SHARD_MODES = ("split", "replicate")


def shard_sample_indices(n_samples: int, shard_index: int, num_shards: int, mode: str) -> list[int]:
    """Global dataset indices run by one shard, in QSL order."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} is outside 0..{num_shards - 1}")
    if mode == "replicate":
        return list(range(n_samples))
    if mode != "split":
        raise ValueError(f"unknown shard mode {mode!r}; expected one of {SHARD_MODES}")
    if num_shards > n_samples:
        raise ValueError(f"{num_shards} shards but only {n_samples} samples: a split shard would be empty")
    base, extra = divmod(n_samples, num_shards)
    start = shard_index * base + min(shard_index, extra)
    stop = start + base + (1 if shard_index < extra else 0)
    return list(range(start, stop))


def layout_name(num_shards: int, gpus_per_shard: int) -> str:
    """Wildcard value naming a shard layout, e.g. ``18x4`` = 18 shards of 4 GPUs."""
    return f"{num_shards}x{gpus_per_shard}"


def parse_layout(layout: str) -> tuple[int, int]:
    shards, _, gpus = layout.partition("x")
    return int(shards), int(gpus)
