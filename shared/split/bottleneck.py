"""A narrow cut: each token's activations projected onto r directions before DP, lifted back after.

DP at the cut clips an example's whole (seq x width) message to norm C and adds N(0, (sigma C)^2) to
every coordinate, so the noise grows with the width while the signal does not. Projecting each
token onto r << hidden directions first (as PrivateLoRA and bottleneck split computing do) cuts
the noise the signal competes with by sqrt(hidden / r), and the bytes sent by hidden / r.

The directions are the top r principal axes of the base model's token embeddings: both sides
compute them from the frozen base alone, with no data and nothing to ship, and the LoRA of the
device's layers learns what to put there. A singular vector's sign is arbitrary, so each is fixed
(largest entry positive) and a phone and a server agree whatever their linear-algebra library.
The device's projection is not trained: it is the same on every device, so SplitFed's averaging of
the devices' parts stays meaningful. The server's lift back to the hidden size is (`lift`), and it
is published with the server's part.
"""

from __future__ import annotations

import dataclasses

import torch

from fleettune.shared.split import model as split_model


@dataclasses.dataclass(frozen=True)
class Projection:
    basis: torch.Tensor  # hidden x r, orthonormal columns
    mean: torch.Tensor  # hidden: the embeddings' mean, which the projection centres on

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def down(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden - self.mean) @ self.basis

    def up(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.basis.T + self.mean


def lift(projection: Projection | None, gain: float = 1.0) -> torch.nn.Linear | None:
    """The server's way back to the hidden size: a linear map it learns, starting as the projection's
    inverse times `gain`. Learning it lets the server scale the noise down (a fixed inverse puts all
    of the noise back into the residual stream: two-part at epsilon 8 then scores worse than the base).

    `gain` (SplitConfig.denoise_gain) is the linear least-squares estimate of the clipped features
    from the noised ones when the signal's power C^2 spreads over the d coordinates: 1 / (1 + sigma^2 d).
    Without noise it is 1, and the lift is exactly the projection's inverse."""
    if projection is None:
        return None
    layer = torch.nn.Linear(projection.rank, projection.basis.shape[0])
    with torch.no_grad():
        layer.weight.copy_(projection.basis * gain)
        layer.bias.copy_(projection.mean)
    return layer


def projection(model, rank: int) -> Projection | None:
    """The rank-r projection at the cut for this base model; None for rank 0 (raw activations)."""
    if rank == 0:
        return None
    embeddings = split_model.decoder(model).embed_tokens.weight.detach().double()
    if not 1 <= rank <= embeddings.shape[1]:
        raise ValueError(f"bottleneck {rank} is not in [1, {embeddings.shape[1]}] for this model")
    mean = embeddings.mean(0)
    _, _, vh = torch.linalg.svd(embeddings - mean, full_matrices=False)
    basis = vh[:rank].T
    signs = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
    return Projection((basis * signs).float().contiguous(), mean.float())
