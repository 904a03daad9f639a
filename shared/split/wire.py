"""Split-learning messages: safetensors in both directions, parsed strictly, never pickled.

A device's step sends `activations` (F32, batch x seq x hidden) and, in the two-part mode, `labels`
(I64, batch x seq). The server answers with `grad` (F32, the loss's gradient at the activations it
received) or, for a U-shaped forward, `hidden` (F32, the activations at the top of its layers).
The shapes a message may have come from the federation's split config and the model, never from
the message: batch <= max_batch, seq == seq_len, hidden == the model's. A message that breaks any
of this is refused with a named reason (the update reader's reasons, plus non_finite and
bad_label), before a tensor reaches the model.
"""

from __future__ import annotations

import secrets

import torch
from safetensors.torch import save

from fleettune.shared import keys
from fleettune.shared.errors import RejectReason, Rejected
from fleettune.shared.protocol.safetensors_reader import DTYPES, parse

WIRE_DTYPES = {"F32": DTYPES["F32"], "I64": (torch.int64, 8)}
MAX_HEADER = 4096
MEDIA_TYPE = "application/vnd.safetensors"
STEP_ID = r"^[0-9a-f]{16}$"  # a U-shaped forward's id, which its backward names


def shared_secret(client) -> bytes:
    """What the gateway shows the split server: created once in Redis, read by both."""
    client.set(keys.SPLIT_SECRET, secrets.token_bytes(32), nx=True)
    return client.get(keys.SPLIT_SECRET)


def encode(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return save({k: v.detach().contiguous() for k, v in tensors.items()}, metadata=metadata)


def max_bytes(batch: int, seq: int, hidden: int) -> int:
    """The largest valid message: activations and labels of a full batch, plus a header."""
    return batch * seq * (hidden * 4 + 8) + MAX_HEADER + 8


def decode(buf: bytes, shapes: dict[str, tuple[int, ...]], vocab: int | None = None) -> dict[str, torch.Tensor]:
    """The named tensors of exactly these shapes, finite, labels within the vocabulary; else Rejected.

    `labels` is I64; every other tensor F32.
    """
    tensors = parse(buf, shapes, MAX_HEADER, WIRE_DTYPES)
    for name, tensor in tensors.items():
        want = torch.int64 if name == "labels" else torch.float32
        if tensor.dtype != want:
            raise Rejected(RejectReason.BAD_DTYPE, f"{name}: {tensor.dtype}, not {want}")
        if want == torch.int64:
            if vocab is not None and tensor.numel() and (tensor.min() < 0 or tensor.max() >= vocab):
                raise Rejected(RejectReason.BAD_LABEL, f"{name}: token ids outside [0, {vocab})")
        elif not torch.isfinite(tensor).all():
            raise Rejected(RejectReason.NON_FINITE, f"{name}: NaN or Inf")
    return {k: v.clone() for k, v in tensors.items()}  # off the request's bytes, and writable
