"""The pure math of a round: update norms, clipping, and streaming weighted FedAvg.

Clipping uses one L2 norm over the whole update (all tensors flattened together), as DP-SGD and
DP-FedAvg do, so one clip bound limits the whole contribution of a device; per-tensor clipping would
let a device spend the bound once per layer.

FedAvg of LoRA factors averages A and B separately, which is inexact for the product B·A
(avg(B)·avg(A) != avg(B·A)); it is exact for soft prompts. The exact schemes are beside it:
FlexLoRA in exact_lora.py, FFA-LoRA (A frozen on devices, so averaging B alone is exact) in
config.py's presets.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

Tensors = Mapping[str, torch.Tensor]


def update_norm(tensors: Tensors) -> float:
    """Global L2 norm; inf or nan when any value is not finite."""
    total = 0.0
    for t in tensors.values():
        flat = t.reshape(-1)
        if flat.dtype != torch.float32:
            flat = flat.float()
        sq = float(torch.dot(flat, flat))
        if not math.isfinite(sq):
            # float32 squares of large finite values overflow; redo in float64 to tell them from inf/nan.
            wide = flat.double()
            sq = float(torch.dot(wide, wide))
        total += sq
    return math.sqrt(total)


def clip_scale(norm: float, max_norm: float | None) -> float:
    """Factor that brings an update of `norm` within `max_norm` (1.0 when it already is)."""
    if not math.isfinite(norm):
        raise ValueError(f"update norm is not finite ({norm})")
    if max_norm is None or norm <= max_norm:
        return 1.0  # also covers norm == 0: nothing to scale
    return max_norm / norm


class StreamingFedAvg:
    """Weighted average of updates seen one at a time; memory is one accumulator, not N updates."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self._acc = {name: torch.zeros(shape, dtype=torch.float32) for name, shape in shapes.items()}
        self.total_weight = 0.0
        self.count = 0

    def add(self, tensors: Tensors, weight: float, scale: float = 1.0) -> None:
        """Accumulate weight * scale * update (scale is the clip factor)."""
        if weight <= 0 or not math.isfinite(weight):
            raise ValueError(f"weight must be positive and finite, got {weight}")
        if tensors.keys() != self._acc.keys():
            raise ValueError("update tensors do not match the accumulator's layout")
        for name, acc in self._acc.items():
            acc.add_(tensors[name], alpha=weight * scale)  # one fused pass, any float dtype in
        self.total_weight += weight
        self.count += 1

    def add_sum(self, sums: Tensors, weight: float, count: int) -> None:
        """Add a pre-weighted sum (Σ weight·scale·update over `count` updates of total `weight`).
        A correction has count 0 and may have a negative weight."""
        if sums.keys() != self._acc.keys():
            raise ValueError("partial sum tensors do not match the accumulator's layout")
        if not math.isfinite(weight):
            raise ValueError(f"weight must be finite, got {weight}")
        for name, acc in self._acc.items():
            acc.add_(sums[name])
        self.total_weight += weight
        self.count += count

    def mean(self) -> dict[str, torch.Tensor]:
        if self.count == 0:
            raise ValueError("FedAvg of zero updates is undefined")
        return {name: acc / self.total_weight for name, acc in self._acc.items()}


def fedavg(updates: Iterable[tuple[Tensors, float]], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Weighted mean of (update, weight) pairs."""
    avg = StreamingFedAvg(shapes)
    for tensors, weight in updates:
        avg.add(tensors, weight)
    return avg.mean()


def apply_update(global_weights: Tensors, mean_delta: Tensors, server_lr: float) -> dict[str, torch.Tensor]:
    """Next global adapter: global + server_lr * mean delta (server_lr 1.0 is plain FedAvg)."""
    if server_lr <= 0 or not math.isfinite(server_lr):
        raise ValueError(f"server learning rate must be positive, got {server_lr}")
    return {name: (w.float() + server_lr * mean_delta[name]).contiguous() for name, w in global_weights.items()}
