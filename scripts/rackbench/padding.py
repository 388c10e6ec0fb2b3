"""Padded token batches: the one helper demo, quantize and the reference engine build batches with."""

from __future__ import annotations

from typing import Sequence


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, *, side: str = "left", device=None):
    """``(ids, mask)``: ``seqs`` padded with ``pad_id`` to the longest, as long tensors [n, width].

    ``side="left"`` (generation and calibration with an attention mask: every row ends at the
    last column) or ``"right"`` (the reference engine's ragged prefill: every row starts at
    position 0). ``mask`` is 1 on real tokens, 0 on padding.
    """
    import torch

    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not seqs:
        raise ValueError("no sequences to pad")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, cols] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, cols] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask
