"""FlexLoRA-style exact aggregation: the weighted mean of each layer's product B·A, re-factorised.

Averaging A and B separately is inexact: mean(B)·mean(A) != mean(B·A). Here each adapted layer's
sum Σ c_i B_i A_i is kept as stacked factors U (out x k) and V (k x in), so no dense out x in matrix
is ever formed. When k passes 2·cap the stack is compressed back to `cap` columns (QR of both
stacks, then an SVD of the small k x k core, as FLoRIST re-factorises), so close memory stays
O(cap · (out + in)) per layer whatever the number of updates. The result is truncated to the
published rank; the energy (sum of squared singular values) that any truncation drops is
reported, so an operator sees how much of the exact mean the published adapter lost.

The published factors are B = U_r S_r and A = V_r^T: A keeps orthonormal rows, about the scale of
PEFT's initial A, and B carries the magnitude, as at initialisation (B = 0).
"""

from __future__ import annotations

import dataclasses

import torch

DTYPE = torch.float64  # the SVD of a difference of near-equal products needs the precision


@dataclasses.dataclass
class Factorised:
    B: torch.Tensor  # (out, rank)
    A: torch.Tensor  # (rank, in)
    energy: float  # squared Frobenius norm of the exact sum
    dropped: float  # squared singular values the truncation to `rank` dropped


class LowRankSum:
    """Σ c_i B_i A_i for one layer, as stacked factors compressed to at most 2·cap columns.

    The stack lives in preallocated buffers (no copy per update); a compression costs two thin QRs
    of out x 2·cap and in x 2·cap, every cap / r updates, so the cost per update grows with cap:
    the working rank trades exactness of the streaming sum for close time.
    """

    def __init__(self, out_features: int, in_features: int, cap: int) -> None:
        if cap < 1:
            raise ValueError(f"working rank must be >= 1, got {cap}")
        self.cap = cap
        self._U = torch.zeros(out_features, 0, dtype=DTYPE)
        self._V = torch.zeros(0, in_features, dtype=DTYPE)
        self.k = 0  # columns in use
        self.dropped = 0.0  # energy dropped by compressions while streaming

    @property
    def U(self) -> torch.Tensor:
        return self._U[:, :self.k]

    @property
    def V(self) -> torch.Tensor:
        return self._V[:self.k]

    def add(self, B: torch.Tensor, A: torch.Tensor, coefficient: float) -> None:
        if B.shape[0] != self._U.shape[0] or A.shape[1] != self._V.shape[1] or B.shape[1] != A.shape[0]:
            raise ValueError(f"factors {tuple(B.shape)} x {tuple(A.shape)} do not fit this layer")
        r = B.shape[1]
        if self.k + r > self._U.shape[1]:
            if self.k + r > 2 * self.cap and self.k > self.cap:
                self._compress()
            self._grow(max(2 * self.cap, self.k + r))
        self._U[:, self.k:self.k + r] = B
        self._U[:, self.k:self.k + r] *= coefficient
        self._V[self.k:self.k + r] = A
        self.k += r

    def scale(self, factor: float) -> None:
        """Multiply the whole sum by `factor`."""
        self._U[:, :self.k] *= factor

    def factorise(self, rank: int) -> Factorised:
        """B (out x rank), A (rank x in) with B·A the best rank-`rank` approximation of the sum."""
        U, V, dropped, energy = _truncate(self.U, self.V, rank)
        pad = rank - U.shape[1]
        if pad > 0:  # the sum has lower rank than published (say out < rank): zero directions
            U = torch.cat([U, torch.zeros(U.shape[0], pad, dtype=DTYPE)], dim=1)
            V = torch.cat([V, torch.zeros(pad, V.shape[1], dtype=DTYPE)], dim=0)
        return Factorised(U, V, energy + self.dropped, dropped + self.dropped)

    def _compress(self) -> None:
        U, V, dropped, _ = _truncate(self.U, self.V, self.cap)
        self.dropped += dropped
        self.k = U.shape[1]
        self._U[:, :self.k], self._V[:self.k] = U, V

    def _grow(self, columns: int) -> None:
        if columns <= self._U.shape[1]:
            return
        U = torch.zeros(self._U.shape[0], columns, dtype=DTYPE)
        V = torch.zeros(columns, self._V.shape[1], dtype=DTYPE)
        U[:, :self.k], V[:self.k] = self.U, self.V
        self._U, self._V = U, V


def _truncate(U: torch.Tensor, V: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(B, A, dropped energy, total energy): B·A is U·V's best rank-`rank` approximation, A's rows orthonormal."""
    Qu, Ru = torch.linalg.qr(U)  # U = Qu Ru, Qu orthonormal columns
    Qv, Rv = torch.linalg.qr(V.T)  # V = Rv^T Qv^T
    P, S, Wt = torch.linalg.svd(Ru @ Rv.T, full_matrices=False)  # the small core
    energy = float((S * S).sum())
    keep = min(rank, S.numel())
    dropped = float((S[keep:] * S[keep:]).sum())
    B = (Qu @ P[:, :keep]) * S[:keep]
    A = (Qv @ Wt[:keep].T).T
    return B, A, dropped, energy


def lora_pairs(names) -> dict[str, tuple[str, str]]:
    """{layer prefix: (B key, A key)} for every LoRA layer among tensor names."""
    pairs = {}
    for name in names:
        if name.endswith(".lora_A.weight"):
            prefix = name[: -len(".lora_A.weight")]
            b = f"{prefix}.lora_B.weight"
            if b in names:
                pairs[prefix] = (b, name)
    return pairs
