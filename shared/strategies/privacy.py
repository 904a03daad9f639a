"""Central DP-FedAvg (McMahan et al. 2018): clip each update to C, add N(0, (z·C)²) to the sum.

The accountant is Google's `dp-accounting` (RDP): each published round is one Gaussian mechanism
with noise multiplier z, Poisson-subsampled at rate q when the federation samples its cohort.
With q = 1 (every eligible device takes part) and a handful of devices, ε is large: DP protects
individuals in large populations, and the README says so.

The noise must be unpredictable to devices yet identical when a killed close is redone (a version
is never written twice with different bytes). It is drawn from a generator seeded by
HMAC-SHA256(the federation's secret, round): reproducible for the server, unknowable without the
secret, which never leaves Redis.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
from collections.abc import Mapping

import torch

Tensors = Mapping[str, torch.Tensor]

logging.getLogger("absl").setLevel(logging.ERROR)  # the RDP accountant logs every order it skips


def noise_seed(secret: bytes, round_no: int) -> int:
    digest = hmac.new(secret, f"dp-noise:{round_no}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def add_noise(total: Tensors, std: float, seed: int) -> dict[str, torch.Tensor]:
    """total + N(0, std²) per coordinate, in a fixed key order so a redo draws the same noise."""
    gen = torch.Generator().manual_seed(seed)
    return {key: (total[key].float() + std * torch.randn(total[key].shape, generator=gen)).contiguous()
            for key in sorted(total)}


def epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> float:
    """(ε, δ)-DP of `rounds` releases of the (subsampled) Gaussian mechanism, by RDP accounting."""
    return ledger_epsilon(((noise_multiplier, sampling_rate, rounds),), delta)


@functools.lru_cache(maxsize=4096)
def noise_for(epsilon_target: float, sampling_rate: float, rounds: int, delta: float) -> float:
    """The smallest noise multiplier (to 1 %) whose RDP epsilon over `rounds` is at most the target."""
    low, high = 0.3, 100.0
    while high / low > 1.01:
        mid = (low * high) ** 0.5
        low, high = (low, mid) if epsilon(mid, sampling_rate, rounds, delta) <= epsilon_target else (mid, high)
    return high


def ledger_epsilon(ledger: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """ε of every release in a federation's DP ledger: (noise multiplier, sampling rate, releases)
    segments, composed, so a change of z or q midway is still counted honestly."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    for noise_multiplier, sampling_rate, rounds in ledger:
        if rounds <= 0:
            continue
        if noise_multiplier <= 0:
            return float("inf")
        event = dp_accounting.GaussianDpEvent(noise_multiplier)
        if sampling_rate < 1.0:
            event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
        accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


def extend(ledger, noise_multiplier: float, sampling_rate: float) -> tuple[tuple[float, float, int], ...]:
    """The ledger after one more release at (z, q)."""
    segments = [tuple(s) for s in ledger]
    if segments and segments[-1][:2] == (noise_multiplier, sampling_rate):
        z, q, n = segments[-1]
        segments[-1] = (z, q, n + 1)
    else:
        segments.append((noise_multiplier, sampling_rate, 1))
    return tuple((float(z), float(q), int(n)) for z, q, n in segments)


def sampled(secret: bytes, round_no: int, device: str, rate: float) -> bool:
    """Poisson sampling of the cohort: each device takes part in a round with probability `rate`,
    independently, decided by the server's secret so a device cannot choose its way in."""
    if rate >= 1.0:
        return True
    digest = hmac.new(secret, f"sample:{round_no}:{device}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") < rate * (1 << 64)


def pick(secret: bytes, round_no: int, devices, count: int) -> list[str]:
    """`count` devices chosen uniformly without replacement for a round (clients_per_round),
    ranked by the server's secret so a device cannot choose its way in."""
    def rank(device: str) -> bytes:
        return hmac.new(secret, f"pick:{round_no}:{device}".encode(), hashlib.sha256).digest()

    return sorted(devices, key=rank)[:count]


def ledger_of(manifest: Mapping) -> tuple[tuple[float, float, int], ...]:
    """The DP releases a published version's manifest records, as (z, q, count) segments."""
    return tuple(tuple(s) for s in (manifest.get("dp") or {}).get("ledger", ()))


def manifest_fields(agg, clip: float | None, ledger: tuple) -> dict | None:
    """A release's DP accounting for its manifest, given the ledger of the version it builds on:
    ε of this round and of every DP release the federation made, this one included (the ledger
    travels in every manifest from the first DP release on). With DP off, the history it had
    stays (None when there is none)."""
    delta = agg.dp_delta
    if not agg.dp:
        return None if not ledger else {"ledger": [list(s) for s in ledger], "releases": sum(n for _, _, n in ledger),
                                        "epsilon": ledger_epsilon(ledger, delta), "delta": delta}
    z, q = agg.dp_noise_multiplier, agg.sampling_rate
    ledger = extend(ledger, z, q)
    return {"noise_multiplier": z, "sampling_rate": q, "delta": delta, "clip": clip,
            "releases": sum(n for _, _, n in ledger), "ledger": [list(s) for s in ledger],
            "epsilon_round": epsilon(z, q, 1, delta),
            "epsilon": ledger_epsilon(ledger, delta), "max_epsilon": agg.dp_max_epsilon,
            # completes the federation now when one more release would pass the budget
            "budget_exhausted": agg.dp_max_epsilon is not None
            and ledger_epsilon(extend(ledger, z, q), delta) > agg.dp_max_epsilon}

