"""A decoder cut at its layers, as pure functions over one PEFT-wrapped Hugging Face causal LM.

Both sides hold the same frozen base with LoRA on every layer; each trains only the LoRA of the
layers it runs. A forward pass is the model's own, one range of layers at a time:
    device   embeddings + layers [0, k)                    -> the split activations h_k
    server   layers [k, m)                                   (two-part: m = L, then the head and loss)
    device   layers [m, L) + final norm + LM head + loss     (U-shaped only: labels never leave it)
so a split at any k with no noise computes exactly what the whole model computes.
"""

from __future__ import annotations

import re

import torch
from transformers.masking_utils import create_causal_mask

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def decoder(model):
    """The LlamaModel-like stack (embed_tokens, layers, norm, rotary_emb) inside a PEFT causal LM."""
    return model.get_base_model().model


def num_layers(model) -> int:
    return len(decoder(model).layers)


def layer_of(name: str) -> int | None:
    found = _LAYER.search(name)
    return int(found.group(1)) if found else None


def trainable(model, layers: range) -> list[torch.nn.Parameter]:
    """The LoRA parameters of these layers: one side's share of the adapter."""
    return [p for n, p in model.named_parameters() if p.requires_grad and layer_of(n) in layers]


def run_layers(model, hidden: torch.Tensor, layers: range) -> torch.Tensor:
    """Decoder layers over hidden states of full sequences (positions from 0, causal attention)."""
    stack = decoder(model)
    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    mask = create_causal_mask(config=stack.config, inputs_embeds=hidden, attention_mask=None, cache=None,
                              position_ids=position_ids)
    rotary = stack.rotary_emb(hidden, position_ids=position_ids)
    for index in layers:
        hidden = stack.layers[index](hidden, attention_mask=mask, position_embeddings=rotary,
                                     position_ids=position_ids)
    return hidden


def bottom(model, input_ids: torch.Tensor, k: int) -> torch.Tensor:
    """Embeddings and layers [0, k): the activations that cross the split."""
    return run_layers(model, decoder(model).embed_tokens(input_ids), range(k))


def head_loss(model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Final norm, LM head and the next-token loss, as the causal LM computes it."""
    logits = model.get_base_model().lm_head(decoder(model).norm(hidden))
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             labels[:, 1:].reshape(-1))


def device_message(model, ids: torch.Tensor, cut: int, projection, clip: float, sigma: float,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(activations at the cut, what leaves the device): layers [0, k), the bottleneck if any, then
    each example clipped and noised. Both keep their graph into the device's layers."""
    hidden = bottom(model, ids, cut)
    features = projection.down(hidden) if projection is not None else hidden
    return hidden, privatize(features, clip, sigma, generator)


def frozen_layers(model, hidden: torch.Tensor, layers: range) -> torch.Tensor:
    """These layers' frozen base, forward only: what a device that keeps the base of the server's
    layers computes on its own clean activations (server_returns = correction)."""
    with torch.no_grad(), model.disable_adapter():
        return run_layers(model, hidden.detach(), layers)


def server_correction(model, received: torch.Tensor, layers: range, lift) -> torch.Tensor:
    """What the server's LoRA changes in its layers' output on what it received: f_LoRA(x) - f_base(x).

    The device adds it to the frozen base of these layers run on its clean activations. It is 0
    while the server's LoRA is (B = 0), so noise at the cut cannot make the model worse than its
    base at the start; it only limits what the server's layers learn. The base pass carries no
    gradient, so the gradient at the cut is the LoRA pass's: without noise, clip or bottleneck,
    loss and gradients are exactly the unsplit model's (a test checks)."""
    inputs = lift(received) if lift is not None else received
    return run_layers(model, inputs, layers) - frozen_layers(model, inputs, layers)


def server_part(model, received: torch.Tensor, layers: range, lift, residual: bool) -> torch.Tensor:
    """The server's layers over what it received, lifted out of the bottleneck by `lift` if any
    (the server's learned r -> hidden map, which starts as the projection's inverse).

    `residual`: return only what the server's layers add to the residual stream. A U-shaped device
    adds it to its own, un-noised activations: the noise then reaches the model only through the
    server's layers' contribution, never through the residual stream itself. The server's view is
    unchanged (what it receives is the same), so this is post-processing on the device, free in DP
    terms. Without noise, clip or bottleneck it is exactly the unsplit model."""
    inputs = lift(received) if lift is not None else received
    out = run_layers(model, inputs, layers)
    return out - inputs if residual else out


def privatize(hidden: torch.Tensor, clip: float, sigma: float, generator: torch.Generator | None = None
              ) -> torch.Tensor:
    """Clip each example's activations to L2 norm `clip`, then add N(0, (sigma * clip)^2) noise.

    Differentiable in `hidden` (the noise is a constant), so the gradient the server returns
    flows back through the clip into the device's layers.
    """
    norms = hidden.flatten(1).norm(dim=1).clamp_min(1e-12)
    scale = (clip / norms).clamp(max=1.0).view(-1, *([1] * (hidden.dim() - 1)))
    clipped = hidden * scale
    if sigma == 0:
        return clipped
    noise = torch.randn(hidden.shape, generator=generator, dtype=hidden.dtype) * (sigma * clip)
    return clipped + noise
