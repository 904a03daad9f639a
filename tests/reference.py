"""An independent float64 numpy reference for one FedAvg round (shares no code with shared/)."""

from __future__ import annotations

import math

import numpy as np


def next_global(prev: dict[str, np.ndarray], deltas: list[dict[str, np.ndarray]], samples: list[int],
                max_grad_norm: float | None, max_num_samples: int, server_lr: float,
                max_weight_ratio: float = 2.0) -> dict[str, np.ndarray]:
    acc = {k: np.zeros(v.shape, dtype=np.float64) for k, v in prev.items()}
    total = 0.0
    cap = max_weight_ratio * float(np.median([min(n, max_num_samples) for n in samples]))
    for delta, n in zip(deltas, samples):
        norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in delta.values()))
        scale = 1.0 if max_grad_norm is None or norm <= max_grad_norm else max_grad_norm / norm
        weight = min(n, max_num_samples, cap)
        for k in acc:
            acc[k] += weight * scale * delta[k].astype(np.float64)
        total += weight
    return {k: prev[k].astype(np.float64) + server_lr * acc[k] / total for k in prev}


def random_deltas(spec_tensors: dict[str, tuple[int, ...]], rng: np.random.Generator, scale: float) -> dict[str, np.ndarray]:
    return {k: (rng.standard_normal(shape) * scale).astype(np.float32) for k, shape in spec_tensors.items()}
