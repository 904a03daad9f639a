"""Robust combination rules, and sample-count weights that one device cannot dominate.

The median and the trimmed mean are coordinate-wise and unweighted (a weighted median would hand
the outcome back to whoever claims the most samples). They are not linear, so they need every
update at once: memory is O(N · adapter), bounded by the caller.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

import torch

Tensors = Mapping[str, torch.Tensor]


def capped_weights(claimed: Sequence[float], max_ratio: float) -> list[float]:
    """Each weight capped at `max_ratio` x the median claim: one device claiming 100,000 samples
    against honest hundreds counts as at most `max_ratio` honest devices."""
    if not claimed:
        return []
    if max_ratio <= 0:
        raise ValueError(f"max_ratio must be > 0, got {max_ratio}")
    cap = max_ratio * statistics.median(claimed)
    return [min(float(w), cap) for w in claimed]


def _sorted(updates: Sequence[Tensors], key: str) -> torch.Tensor:
    """Each coordinate's values in order, along the last (contiguous) axis: sorting there is ~5x
    faster than across updates. float32 sorts exactly; only the sums below need float64."""
    return torch.stack([u[key].float() for u in updates], dim=-1).sort(dim=-1).values


def coordinate_median(updates: Sequence[Tensors]) -> dict[str, torch.Tensor]:
    """The per-coordinate median (the mean of the two middle values for an even count)."""
    if not updates:
        raise ValueError("the median of zero updates is undefined")
    n = len(updates)
    out = {}
    for key in updates[0]:
        s = _sorted(updates, key)
        out[key] = ((s[..., (n - 1) // 2].double() + s[..., n // 2].double()) / 2).float()
    return out


def trimmed_mean(updates: Sequence[Tensors], trim: int) -> dict[str, torch.Tensor]:
    """The per-coordinate mean after dropping the `trim` largest and `trim` smallest values."""
    n = len(updates)
    if trim < 0 or n <= 2 * trim:
        raise ValueError(f"trimmed mean needs n > 2k: n = {n} updates, k = {trim}")
    out = {}
    for key in updates[0]:
        out[key] = _sorted(updates, key)[..., trim:n - trim].double().mean(dim=-1).float()
    return out
