"""Partial sums of a round's updates, folded as they arrive, so a close reduces a handful of them.

Only linear rules fold (AggregationConfig.folds). The one non-linear piece is the sample-weight
cap: a weight is min(n_i, c) with c = max_weight_ratio x the median claim of the *whole* round,
unknown until the round closes. So a partial folds against the round's provisional cap t (the
previous round's cap; none in the first round), in two sums:

    low  = Σ n_i · s_i · x_i   over updates with n_i <= t  (weight n_i, exact while n_i <= c)
    high = Σ       s_i · x_i   over updates with n_i >  t  (weight c once c is known, exact while n_i >= c)

At the close, low + c·high is exact except for updates whose claim lies between t and c; those
few are read again and corrected by (min(n_i, c) - folded weight)·s_i·x_i (`correction`). Under
central DP every weight is 1, so nothing depends on the cap.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from shared.safetensors_reader import SERVER_DTYPES, parse

Tensors = Mapping[str, torch.Tensor]
LOW, HIGH = "low.", "high."


def folded_weight(claim: float, threshold: float | None, cap: float, uniform: bool) -> float:
    """The weight an update carries inside a partial once the round's cap `cap` is known."""
    if uniform:
        return 1.0
    return float(claim) if threshold is None or claim <= threshold else cap


def final_weight(claim: float, cap: float | None, uniform: bool) -> float:
    if uniform:
        return 1.0
    return float(claim) if cap is None else min(float(claim), cap)


def needs_correction(claim: float, threshold: float | None, cap: float, uniform: bool) -> float:
    """final - folded weight of one folded update (0.0: its partial already weighs it right)."""
    return final_weight(claim, cap, uniform) - folded_weight(claim, threshold, cap, uniform)


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
        n = self.count
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
    """low and high sums (the global shapes, control variates included) of some updates.

    `shapes` are the round's update tensors at the global rank: a lower-rank tier's update is
    zero-padded before it is added, as the streaming mean does. Sums are float64: a correction
    subtracts most of a large folded term again, which float32 would leave visible."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], threshold: float | None, uniform: bool) -> None:
        self.shapes = dict(shapes)
        self.threshold, self.uniform = threshold, uniform
        self.low = {k: torch.zeros(s, dtype=torch.float64) for k, s in self.shapes.items()}
        self.high: dict[str, torch.Tensor] | None = None  # most rounds never need it
        self.n_low = self.n_high = 0
        self.w_low = 0.0

    def add(self, update: Tensors, claim: float, clip_scale: float) -> None:
        if update.keys() != self.low.keys():
            raise ValueError("update tensors do not match the partial's layout")
        if not self.uniform and self.threshold is not None and claim > self.threshold:
            if self.high is None:
                self.high = {k: torch.zeros(s, dtype=torch.float64) for k, s in self.shapes.items()}
            for k, acc in self.high.items():
                acc.add_(update[k], alpha=clip_scale)
            self.n_high += 1
            return
        weight = 1.0 if self.uniform else float(claim)
        for k, acc in self.low.items():
            acc.add_(update[k], alpha=weight * clip_scale)
        self.n_low += 1
        self.w_low += weight

    @property
    def count(self) -> int:
        return self.n_low + self.n_high

    def contribution(self, cap: float | None) -> tuple[dict[str, torch.Tensor], float, int]:
        """(Σ folded weight·clip·update, Σ folded weights, count) once the round's cap is known."""
        if not self.n_high:
            return self.low, self.w_low, self.n_low
        if cap is None:
            raise ValueError("a partial with updates above its threshold needs the round's cap")
        return ({k: v + cap * self.high[k] for k, v in self.low.items()},
                self.w_low + cap * self.n_high, self.count)

    def metadata(self) -> dict[str, Any]:
        return {"n_low": self.n_low, "n_high": self.n_high, "w_low": self.w_low, "threshold": self.threshold,
                "uniform": self.uniform}

    def encode(self) -> bytes:
        tensors = {LOW + k: v for k, v in self.low.items()}
        if self.high is not None:
            tensors.update({HIGH + k: v for k, v in self.high.items()})
        return save_safetensors({k: v.contiguous() for k, v in sorted(tensors.items())})

    @classmethod
    def decode(cls, blob: bytes, shapes: Mapping[str, tuple[int, ...]], meta: Mapping[str, Any],
               max_header_bytes: int) -> PartialSum:
        """A partial read back from the store, checked against the layout like any update."""
        has_high = int(meta["n_high"]) > 0
        layout = {LOW + k: s for k, s in shapes.items()}
        if has_high:
            layout.update({HIGH + k: s for k, s in shapes.items()})
        tensors = parse(blob, layout, max_header_bytes, SERVER_DTYPES)
        out = cls(shapes, meta["threshold"], bool(meta["uniform"]))
        out.low = {k: tensors[LOW + k] for k in shapes}
        out.high = {k: tensors[HIGH + k] for k in shapes} if has_high else None
        out.n_low, out.n_high, out.w_low = int(meta["n_low"]), int(meta["n_high"]), float(meta["w_low"])
        if not math.isfinite(out.w_low):
            raise ValueError("a partial's weight is not finite")
        return out
