"""One round's aggregation: accepted updates in, the next global adapter (and its state) out.

`RoundAggregator` is fed the round's updates one at a time, each with its weight and clip scale;
`finish` combines them under the federation's AggregationConfig and takes the server step. The
close in `shared.pipeline.rounds` does the I/O around it; nothing here touches Redis or the object store.

Memory: the mean and the exact mean stream (one accumulator, or 2·cap factor columns per layer);
the median and trimmed mean hold every update, up to `max_robust_updates`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch

from fleettune.shared.strategies.fedavg import StreamingFedAvg, update_norm
from fleettune.shared.strategies import privacy, robust, server_optimizers
from fleettune.shared.strategies.config import CONTROL_PREFIX, AggregationConfig
from fleettune.shared.strategies.exact_lora import LowRankSum, lora_pairs

Tensors = Mapping[str, torch.Tensor]


@dataclasses.dataclass
class RoundResult:
    weights: dict[str, torch.Tensor]
    optimizer_state: dict[str, torch.Tensor]
    mean_delta_norm: float
    fields: dict[str, Any]  # for the version's manifest
    tiers: dict[int, dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)  # rank -> adapter
    control: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # SCAFFOLD's next c


class RoundAggregator:
    """Folds a round's updates in one at a time, then combines them under an AggregationConfig.

    Heterogeneous ranks: `tier_bases` maps each lower rank devices train to its current adapter
    (deltas are relative to it), and `alpha` is the LoRA alpha: a rank-r adapter applies
    (alpha / r)·B·A. Exact mode sums those products; naive mode zero-pads factors to `rank`
    (HetLoRA's padding) and gives each tier the leading slice of the global factors."""

    def __init__(self, agg: AggregationConfig, base: Tensors, update_shapes: Mapping[str, tuple[int, ...]],
                 rank: int, alpha: float | None = None, tier_bases: Mapping[int, Tensors] | None = None) -> None:
        controls = {k: v for k, v in update_shapes.items() if k.startswith(CONTROL_PREFIX)}
        self.agg, self.base, self.rank = agg, base, rank
        self.shapes = {k: v for k, v in update_shapes.items() if k not in controls}
        self.alpha = float(alpha if alpha is not None else rank)  # a common scale cancels when ranks agree
        self.tier_bases = dict(tier_bases or {})
        # SCAFFOLD: the mean change of the devices' control variates (see `scaffold_step`)
        self._controls = StreamingFedAvg(controls) if agg.drift_control == "scaffold" else None
        self.count = 0
        self.total_weight = 0.0
        self.device_noise_std = 0.0  # distributed DP: noise the devices added to the sum (secure aggregation)
        self._mean = StreamingFedAvg(self.shapes) if agg.rule == "mean" and agg.lora != "exact" else None
        self._kept: list[dict[str, torch.Tensor]] = []
        self._pairs = lora_pairs(self.shapes) if agg.lora == "exact" else {}
        self._sums = {prefix: LowRankSum(self.shapes[b][0], self.shapes[a][1], agg.working_rank_factor * rank)
                      for prefix, (b, a) in self._pairs.items()}
        unpaired = set(self.shapes) - {k for pair in self._pairs.values() for k in pair}
        if agg.lora == "exact" and unpaired:
            raise ValueError(f"exact aggregation needs LoRA factor pairs; {sorted(unpaired)[:3]} are not")

    @property
    def full(self) -> bool:
        """The median and trimmed mean hold every update: true once they hold max_robust_updates."""
        return self.agg.rule != "mean" and self.count >= self.agg.max_robust_updates

    def add(self, update: Tensors, weight: float, clip_scale: float, rank: int | None = None) -> None:
        """One accepted update: its delta tensors, its (capped) weight and its clip factor; `rank`
        when its device's tier trains a lower rank than the global adapter. Under SCAFFOLD it also
        carries the change of the device's control variate (clipped together with the delta)."""
        rank = rank or self.rank
        if rank != self.rank and rank not in self.tier_bases:
            raise ValueError(f"an update of rank {rank} has no tier base")
        if self.agg.dp:
            weight = 1.0  # DP-FedAvg: every clipped update counts the same, so C bounds each one
        if self._controls is not None:
            self._controls.add({k: update[k] for k in self._controls_keys()}, weight, clip_scale)
            update = {k: v for k, v in update.items() if not k.startswith(CONTROL_PREFIX)}
        if self._mean is not None:
            self._mean.add(update if rank == self.rank else padded(update, self.shapes), weight, clip_scale)
        elif self.agg.lora == "exact":
            base = self.base if rank == self.rank else self.tier_bases[rank]
            for prefix, (b, a) in self._pairs.items():
                B = base[b].double() + clip_scale * update[b].double()
                A = base[a].double() + clip_scale * update[a].double()
                self._sums[prefix].add(B, A, weight * self.alpha / rank)  # its (alpha / r)·B·A
        else:
            if self.full:
                raise ValueError(f"{self.agg.rule} holds every update: more than max_robust_updates "
                                 f"({self.agg.max_robust_updates}) in one round")
            self._kept.append({k: clip_scale * v.float() for k, v in update.items()})
        self.count += 1
        self.total_weight += weight

    def add_sum(self, sums: Tensors, weight: float, count: int) -> None:
        """A partial sum Σ weight·clip·update over `count` updates of total `weight`, in the global
        shapes (lower ranks zero-padded, SCAFFOLD's control changes included): the mean rule only.
        A correction of one update's weight has count 0 and may have a negative weight."""
        if self._mean is None:
            raise ValueError(f"rule {self.agg.rule!r} with lora {self.agg.lora!r} does not fold partial sums")
        if self._controls is not None:
            self._controls.add_sum({k: sums[k] for k in self._controls_keys()}, weight, count)
        self._mean.add_sum({k: sums[k] for k in self.shapes}, weight, count)
        self.count += count
        self.total_weight += weight

    def finish(self, server_lr: float, state: Tensors, clip_bound: float | None = None, noise_seed: int = 0,
               control: Tensors | None = None, participation: float = 1.0) -> RoundResult:
        """Combine, then take the server step. SCAFFOLD: `control` is the current server control
        variate c (empty: zero) and `participation` |S| / N, this round's share of the population."""
        result = self._finish(server_lr, state, clip_bound, noise_seed)
        if self._controls is not None:
            changes = {k[len(CONTROL_PREFIX):]: v for k, v in self._controls.mean().items()}
            result.control = scaffold_step(control or {}, changes, participation)
        return result

    def _controls_keys(self) -> list[str]:
        return [CONTROL_PREFIX + k for k in self.shapes]

    def _finish(self, server_lr: float, state: Tensors, clip_bound: float | None, noise_seed: int) -> RoundResult:
        if self.count == 0:
            raise ValueError("aggregation of zero updates is undefined")
        agg = self.agg
        fields = {"algorithm": agg.algorithm, "lora": agg.lora, "rule": agg.rule, "optimizer": agg.optimizer}
        if agg.lora == "exact":
            weights, dropped, energy = self._exact(server_lr)
            fields["truncation_energy_dropped"] = dropped / energy if energy > 0 else 0.0
            delta = {k: weights[k] - self.base[k].float() for k in self.shapes}
            tiers = {}
            for rank in sorted(self.tier_bases):
                tiers[rank], tier_dropped, tier_energy = self._factorised(rank)
                fields[f"truncation_energy_dropped_rank{rank}"] = tier_dropped / tier_energy if tier_energy > 0 else 0.0
            return RoundResult(weights, {}, update_norm(delta), fields, tiers)
        if agg.rule == "median":
            delta = robust.coordinate_median(self._kept)
        elif agg.rule == "trimmed_mean":
            delta = robust.trimmed_mean(self._kept, agg.trim)
        else:
            delta = self._mean.mean()
        if agg.dp:
            if clip_bound is None:
                raise ValueError("DP needs a clip bound (the round policy's max_update_norm)")
            std = agg.dp_noise_multiplier * clip_bound
            # under secure aggregation the devices added noise already: the server adds what is missing
            server_std = math.sqrt(max(0.0, std ** 2 - self.device_noise_std ** 2))
            total = {k: v * self.total_weight for k, v in delta.items()}
            delta = {k: v / self.total_weight for k, v in privacy.add_noise(total, server_std, noise_seed).items()}
            fields["dp_noise_std_on_sum"] = max(std, self.device_noise_std)
            if self.device_noise_std:
                fields["dp_device_noise_std_on_sum"] = self.device_noise_std
                fields["dp_server_noise_std_on_sum"] = server_std
        weights, new_state = server_optimizers.step(agg.optimizer, self.base, delta, state, server_lr,
                                                    agg.beta1, agg.beta2, agg.tau, agg.bias_correction)
        tiers = {rank: _leading(weights, self.tier_bases[rank]) for rank in sorted(self.tier_bases)}
        return RoundResult(weights, new_state, update_norm(delta), fields, tiers)

    def _exact(self, server_lr: float) -> tuple[dict[str, torch.Tensor], float, float]:
        """(1 - η)·W_g + η·Σ w_i W_i / W per layer (W = (alpha / r)·B·A), re-factorised to the rank."""
        for prefix, (b, a) in self._pairs.items():
            acc = self._sums[prefix]
            acc.scale(server_lr / self.total_weight)
            if server_lr != 1.0:
                acc.add(self.base[b].double(), self.base[a].double(), (1.0 - server_lr) * self.alpha / self.rank)
        return self._factorised(self.rank)

    def _factorised(self, rank: int) -> tuple[dict[str, torch.Tensor], float, float]:
        """Every layer's sum as a rank-`rank` adapter (B scaled by rank / alpha), with the energy dropped."""
        weights = {k: v.float().clone() for k, v in (self.base if rank == self.rank else self.tier_bases[rank]).items()}
        dropped = energy = 0.0
        for prefix, (b, a) in self._pairs.items():
            out = self._sums[prefix].factorise(rank)
            weights[b], weights[a] = (out.B * (rank / self.alpha)).float().contiguous(), out.A.float().contiguous()
            dropped, energy = dropped + out.dropped, energy + out.energy
        return weights, dropped, energy


def scaffold_step(control: Tensors, changes: Tensors, participation: float) -> dict[str, torch.Tensor]:
    """SCAFFOLD's server control variate after a round (Karimireddy et al. 2020):
    c += |S| / N · mean(Δc_i), Δc_i being each participating device's change of its own c_i."""
    return {k: ((control[k].float() if k in control else torch.zeros_like(d)) + participation * d).contiguous()
            for k, d in changes.items()}


def padded(update: Tensors, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A lower-rank update zero-padded to the global shapes (B's columns, A's rows)."""
    out = {}
    for k, v in update.items():
        if tuple(v.shape) == tuple(shapes[k]):
            out[k] = v
            continue
        full = torch.zeros(shapes[k], dtype=v.dtype)
        full[tuple(slice(0, n) for n in v.shape)] = v
        out[k] = full
    return out


def _leading(weights: Tensors, like: Tensors) -> dict[str, torch.Tensor]:
    """A tier's adapter as the leading slice of the global factors (zero-padding's inverse)."""
    return {k: weights[k][tuple(slice(0, n) for n in v.shape)].contiguous() for k, v in like.items()}
