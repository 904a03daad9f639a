"""Server optimizers over the round's pseudo-gradient (Reddi et al. 2021, "Adaptive Federated
Optimization", Algorithm 2).

The pseudo-gradient is the weighted mean update Δ. With x the global adapter:

    sgd (FedAvg)   x += η Δ
    avgm           m = β1 m + Δ;                x += η m
    adam           m = β1 m + (1-β1) Δ;  v = β2 v + (1-β2) Δ²;          x += η m / (√v + τ)
    yogi           ...                   v = v - (1-β2) Δ² sign(v - Δ²); ...
    adagrad        ...                   v = v + Δ²;                     ...

As in the paper there is no bias correction and v starts at τ². The state is a flat dict of float32
tensors plus a step counter, so it is stored as safetensors next to the version it produced and a
restarted worker, or a redone close, continues from exactly the same state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, get_args

import torch

Tensors = Mapping[str, torch.Tensor]
ServerOptimizer = Literal["sgd", "avgm", "adam", "yogi", "adagrad"]
OPTIMIZERS: tuple[ServerOptimizer, ...] = get_args(ServerOptimizer)
ADAPTIVE: tuple[ServerOptimizer, ...] = ("adam", "yogi", "adagrad")
STEP_KEY = "__step__"  # the step counter, stored as a one-element tensor beside the moments


def step(name: str, weights: Tensors, delta: Tensors, state: Tensors, lr: float, beta1: float = 0.9,
         beta2: float = 0.99, tau: float = 1e-3, bias_correction: bool = False,
         ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One server step: (new weights, new state). Pure: the inputs are not modified.

    Only the tensors in `delta` move (FFA-LoRA sends B alone; the frozen A stays as it is).
    `bias_correction` divides m and v by (1 - beta^t) as Kingma & Ba's Adam does (the paper's
    FedAdam does not): without it, beta2 = 0.999 makes the first steps several times too large.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown server optimizer {name!r}; known: {OPTIMIZERS}")
    if not lr > 0:
        raise ValueError(f"server learning rate must be > 0, got {lr}")
    new_weights = {k: w.float().clone() for k, w in weights.items()}
    new_state: dict[str, torch.Tensor] = {}
    steps = int(state[STEP_KEY].item()) if STEP_KEY in state else 0
    for key, d in delta.items():
        d = d.float()
        if name == "sgd":
            move = d
        elif name == "avgm":
            m = beta1 * state[f"m.{key}"] + d if f"m.{key}" in state else d.clone()
            new_state[f"m.{key}"] = m
            move = m
        else:
            m = state.get(f"m.{key}", torch.zeros_like(d))
            v = state.get(f"v.{key}", torch.full_like(d, tau * tau))
            m = beta1 * m + (1 - beta1) * d
            d2 = d * d
            if name == "adam":
                v = beta2 * v + (1 - beta2) * d2
            elif name == "yogi":
                v = v - (1 - beta2) * d2 * torch.sign(v - d2)
            else:
                v = v + d2
            new_state[f"m.{key}"], new_state[f"v.{key}"] = m, v
            if bias_correction and name == "adam":
                t = steps + 1
                m, v = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
            move = m / (v.sqrt() + tau)
        new_weights[key] = (new_weights[key] + lr * move).contiguous()
    if name != "sgd":
        new_state[STEP_KEY] = torch.tensor([steps + 1], dtype=torch.float32)
    return new_weights, {k: v.contiguous() for k, v in new_state.items()}
