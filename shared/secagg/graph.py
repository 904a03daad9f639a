"""The neighbour graph of SecAgg+: a Harary graph over a secret-keyed shuffle of the cohort.

Each device shares its secrets with, and masks against, only its k neighbours, so its cost grows
with log n instead of n (Bell et al. 2020). Devices sit on a ring in the order of
HMAC-SHA256(seed, device id) and each links to k/2 on either side: k-regular, and no device can
choose its neighbours, because the seed is the server's secret until the graph is published.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
from collections.abc import Iterable


ROUND_FAILURE = 2.0 ** -20  # chance, per attempt, that some device keeps fewer than t live neighbours


def default_degree(n: int, dropout: float = 1 / 3) -> int:
    """The smallest even k for which, with each device dropping with probability `dropout`, every
    device keeps at least t = k/2 + 1 live neighbours except with probability ROUND_FAILURE (a
    union bound over the n devices). It grows as O(log n): 292 at n = 300, 312 at 1,000, 350 at
    10,000; below about 300 devices it is everyone (n − 1), which is plain SecAgg."""
    for k in range(2, n - 1, 2):
        if n * _dropout_tail(k, dropout, default_threshold(k)) <= ROUND_FAILURE:
            return k
    return n - 1


def _dropout_tail(k: int, p: float, t: int) -> float:
    """P[more than k − t of k neighbours drop], each independently with probability p."""
    return sum(math.comb(k, j) * p ** j * (1 - p) ** (k - j) for j in range(k - t + 1, k + 1))


def default_threshold(k: int) -> int:
    """t > k/2: honest neighbours each reveal one kind of share per device, so a server holding
    t of one kind cannot also hold t of the other."""
    return k // 2 + 1


@dataclasses.dataclass(frozen=True)
class Graph:
    order: tuple[str, ...]  # the cohort on the ring; a device's Shamir point is its index + 1
    degree: int

    def neighbours(self, device: str) -> tuple[str, ...]:
        n = len(self.order)
        if self.degree >= n - 1:
            return tuple(d for d in self.order if d != device)
        i = self.index(device)
        half = self.degree // 2
        return tuple(self.order[(i + off) % n] for off in range(-half, half + 1) if off)

    def index(self, device: str) -> int:
        return self._positions()[device]

    def point(self, device: str) -> int:
        return self.index(device) + 1

    def __contains__(self, device: str) -> bool:
        return device in self._positions()

    def _positions(self) -> dict[str, int]:
        cached = self.__dict__.get("_pos")
        if cached is None:
            cached = {d: i for i, d in enumerate(self.order)}
            object.__setattr__(self, "_pos", cached)
        return cached

    def as_dict(self) -> dict:
        return {"order": list(self.order), "degree": self.degree}

    @classmethod
    def from_dict(cls, d: dict) -> Graph:
        return cls(tuple(d["order"]), int(d["degree"]))


def build(cohort: Iterable[str], seed: bytes, degree: int | None = None, dropout: float = 1 / 3) -> Graph:
    """The graph over `cohort` for one attempt; `seed` is secret until the graph is published."""
    devices = sorted(set(cohort))
    if len(devices) < 2:
        raise ValueError("secure aggregation needs at least 2 devices")
    k = default_degree(len(devices), dropout) if degree is None else min(degree, len(devices) - 1)
    if k < 2 or (k < len(devices) - 1 and k % 2):
        raise ValueError(f"degree {k} must be even and at least 2 (or every other device)")
    order = sorted(devices, key=lambda d: hmac.new(seed, d.encode(), hashlib.sha256).digest())
    return Graph(tuple(order), k)
