"""Robust combination rules: the coordinate-wise median and trimmed mean.

The median and the trimmed mean are coordinate-wise and unweighted (a weighted median would hand
the outcome back to whoever claims the most samples). They are not linear, so they need every
update at once: memory is O(N · adapter), bounded by the caller.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

Tensors = Mapping[str, torch.Tensor]


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
