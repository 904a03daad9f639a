"""An independent float64 numpy reference for one FedAvg round (shares no code with shared/)."""

from __future__ import annotations

import math

import numpy as np


def median_claim(samples: list[int], max_num_samples: int = 100_000) -> float:
    return float(np.median([min(n, max_num_samples) for n in samples]))


def mean_delta(deltas: list[dict[str, np.ndarray]], samples: list[int], max_update_norm: float | None,
               max_num_samples: int = 100_000, max_weight_ratio: float = 2.0,
               reference_claim: float | None = None) -> dict[str, np.ndarray]:
    """The clipped, weighted mean update. Weights are capped at max_weight_ratio x the reference
    claim: the previous round's median claim, or (a first round of fewer than 32 updates) this one's."""
    acc = {k: np.zeros(v.shape, dtype=np.float64) for k, v in deltas[0].items()}
    total = 0.0
    if reference_claim is None:
        reference_claim = median_claim(samples, max_num_samples)
    cap = max_weight_ratio * reference_claim
    for delta, n in zip(deltas, samples):
        norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in delta.values()))
        scale = 1.0 if max_update_norm is None or norm <= max_update_norm else max_update_norm / norm
        weight = min(n, max_num_samples, cap)
        for k in acc:
            acc[k] += weight * scale * delta[k].astype(np.float64)
        total += weight
    return {k: v / total for k, v in acc.items()}


def next_global(prev: dict[str, np.ndarray], deltas: list[dict[str, np.ndarray]], samples: list[int],
                max_update_norm: float | None, max_num_samples: int, server_lr: float,
                max_weight_ratio: float = 2.0, reference_claim: float | None = None) -> dict[str, np.ndarray]:
    mean = mean_delta(deltas, samples, max_update_norm, max_num_samples, max_weight_ratio, reference_claim)
    return {k: prev[k].astype(np.float64) + server_lr * mean[k] for k in prev}


def server_optimizer(name: str, x: np.ndarray, deltas: list[np.ndarray], lr: float, b1: float = 0.9,
                     b2: float = 0.99, tau: float = 1e-3, bias_correction: bool = False) -> np.ndarray:
    """Reddi et al. 2021, Algorithm 2, over a sequence of pseudo-gradients (v starts at tau^2);
    with `bias_correction`, Adam's m and v are divided by (1 - beta^t) as in Kingma & Ba."""
    m, v = None, np.full_like(x, tau * tau)
    for t, d in enumerate(deltas, start=1):
        if name == "avgm":
            m = d.copy() if m is None else b1 * m + d
            x = x + lr * m
            continue
        m = (1 - b1) * d if m is None else b1 * m + (1 - b1) * d
        if name == "adam":
            v = b2 * v + (1 - b2) * d * d
        elif name == "yogi":
            v = v - (1 - b2) * d * d * np.sign(v - d * d)
        else:
            v = v + d * d
        if bias_correction:
            x = x + lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + tau)
        else:
            x = x + lr * m / (np.sqrt(v) + tau)
    return x


def random_deltas(spec_tensors: dict[str, tuple[int, ...]], rng: np.random.Generator, scale: float) -> dict[str, np.ndarray]:
    return {k: (rng.standard_normal(shape) * scale).astype(np.float32) for k, shape in spec_tensors.items()}
