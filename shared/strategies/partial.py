"""Partial sums of a round's updates, folded as they arrive, so a close reduces a handful of them.

Only linear rules fold (AggregationConfig.folds). A weight is min(n_i, cap), and the cap must be
known when an update is folded, so it is fixed per round before devices can move it:
max_weight_ratio x the *reference claim*, the median sample count of the previous round (set when
the round opens) or, in a federation's first round, of its first REFERENCE_SAMPLE accepted
updates (set by the accept that completes them). The few updates folded before that (first
round only) are folded at n_i and re-weighed at the close (`correction`), so a partial's cost
and the close's do not grow with the round. Under central DP every weight is 1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from fleettune.shared.protocol.safetensors_reader import SERVER_DTYPES, parse

Tensors = Mapping[str, torch.Tensor]
REFERENCE_SAMPLE = 32  # accepted updates whose median claim fixes a first round's weight cap
SUM, EARLY = "sum.", "early."


def weight_cap(reference_claim: float | None, max_ratio: float, uniform: bool) -> float | None:
    """The round's cap on a sample weight (None: no cap yet, or uniform weights under DP)."""
    return None if uniform or reference_claim is None else max_ratio * reference_claim


def weight(claim: float, cap: float | None, uniform: bool) -> float:
    if uniform:
        return 1.0
    return float(claim) if cap is None else min(float(claim), cap)


def record_weight(record: Any, cap: float | None, uniform: bool) -> float:
    """An accepted update's weight in the mean: its (capped) sample claim times its async
    participation weight. Uniform under DP, which bounds every update's share of the mean."""
    if uniform:
        return 1.0
    return weight(record.num_samples, cap, False) * record.participation


@dataclasses.dataclass
class UpdateStats:
    """The manifest's per-round figures, kept as sums so partials merge them without the records."""

    count: int = 0
    samples: int = 0
    norm_sum: float = 0.0
    norm_max: float = 0.0
    post_clip_sum: float = 0.0
    clipped: int = 0
    train_seconds_sum: float = 0.0
    last_accepted_at: float = 0.0

    def add(self, record: Any) -> None:
        self.count += 1
        self.samples += int(record.num_samples)
        self.norm_sum += record.norm
        self.norm_max = max(self.norm_max, record.norm)
        self.post_clip_sum += record.norm * record.clip_scale
        self.clipped += record.clip_scale < 1.0
        self.train_seconds_sum += record.train_seconds
        self.last_accepted_at = max(self.last_accepted_at, record.accepted_at)

    def merge(self, other: UpdateStats) -> None:
        for field in ("count", "samples", "norm_sum", "post_clip_sum", "clipped", "train_seconds_sum"):
            setattr(self, field, getattr(self, field) + getattr(other, field))
        self.norm_max = max(self.norm_max, other.norm_max)
        self.last_accepted_at = max(self.last_accepted_at, other.last_accepted_at)

    def manifest_fields(self) -> dict[str, Any]:
        """The figures; none of the per-update ones when no update was seen one by one (a secure
        round's server sees only their sum)."""
        n = self.count
        if n == 0:
            return {"total_samples": self.samples}
        return {
            "total_samples": self.samples,
            "update_norms": {"pre_clip_mean": self.norm_sum / n, "pre_clip_max": self.norm_max,
                             "post_clip_mean": self.post_clip_sum / n, "clipped": self.clipped},
            "train_seconds_mean": self.train_seconds_sum / n,
            "last_update_at": self.last_accepted_at,
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> UpdateStats:
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls)})


class PartialSum:
    """Σ weight·clip·update over some updates, in the global shapes (control variates included).

    A lower-rank tier's update is zero-padded before it is added, as the streaming mean does.
    `sum` is float32, like the streaming mean's accumulator (and 30x faster to add into than
    float64). Updates folded before the round's cap was known go into `early`, float64: the
    close subtracts most of a large claim's term again, which float32 would leave visible."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.shapes = dict(shapes)
        self.sum = {k: torch.zeros(s, dtype=torch.float32) for k, s in self.shapes.items()}
        self.early: dict[str, torch.Tensor] | None = None  # a first round's first few only
        self.count = 0
        self.weight = 0.0

    def add(self, update: Tensors, weight: float, clip_scale: float, early: bool = False) -> None:
        if update.keys() != self.sum.keys():
            raise ValueError("update tensors do not match the partial's layout")
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"weight must be positive and finite, got {weight}")
        if early and self.early is None:
            self.early = {k: torch.zeros(s, dtype=torch.float64) for k, s in self.shapes.items()}
        for k, acc in (self.early if early else self.sum).items():
            acc.add_(update[k], alpha=weight * clip_scale)
        self.count += 1
        self.weight += weight

    def add_to(self, total: dict[str, torch.Tensor]) -> None:
        """Add both sums into a float64 total."""
        for k, acc in total.items():
            acc.add_(self.sum[k])
            if self.early is not None:
                acc.add_(self.early[k])

    def metadata(self) -> dict[str, Any]:
        return {"count": self.count, "weight": self.weight, "early": self.early is not None}

    def encode(self) -> bytes:
        tensors = {SUM + k: v for k, v in self.sum.items()}
        if self.early is not None:
            tensors.update({EARLY + k: v for k, v in self.early.items()})
        return save_safetensors({k: v.contiguous() for k, v in sorted(tensors.items())})

    @classmethod
    def decode(cls, blob: bytes, shapes: Mapping[str, tuple[int, ...]], meta: Mapping[str, Any],
               max_header_bytes: int) -> PartialSum:
        """A partial read back from the store, checked against the layout like any update."""
        layout = {SUM + k: s for k, s in shapes.items()}
        if meta["early"]:
            layout.update({EARLY + k: s for k, s in shapes.items()})
        tensors = parse(blob, layout, max_header_bytes, SERVER_DTYPES)
        out = cls.__new__(cls)
        out.shapes = dict(shapes)
        out.sum = {k: tensors[SUM + k] for k in shapes}
        out.early = {k: tensors[EARLY + k] for k in shapes} if meta["early"] else None
        out.count, out.weight = int(meta["count"]), float(meta["weight"])
        if not math.isfinite(out.weight) or any(v.dtype != torch.float32 for v in out.sum.values()) or (
                out.early is not None and any(v.dtype != torch.float64 for v in out.early.values())):
            raise ValueError("a partial holds a float32 sum, a float64 early sum and a finite weight")
        return out
