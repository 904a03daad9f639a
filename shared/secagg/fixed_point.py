"""Fixed-point encoding of [w, w·x] mod 2^32 or 2^64, chosen so a cohort's sum cannot wrap.

A device clips its update x to L2 norm `clip` (so every coordinate is within ±clip), caps its
weight w at `max_weight`, scales [w, w·x] by 2^frac_bits and rounds stochastically (unbiased,
error below one unit per coordinate). The sum of n such vectors is below n·max_weight·clip·2^f + n
in magnitude; the modulus is the smallest of 2^32 and 2^64 whose signed half holds that at the
precision asked, so the masked sum decodes exactly to Σ w·x up to the rounding: a weighted mean off
by at most n / (Σw · 2^f) per coordinate (`Encoding.mean_error_bound`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from fleettune.shared.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Encoding:
    bits: int  # 32 or 64: the modulus is 2^bits
    frac_bits: int  # fixed-point scale 2^frac_bits
    clip: float
    max_weight: int
    max_devices: int
    noise_std: float = 0.0  # distributed DP: the N(0, noise_std²) each device adds to its clipped update

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint32 if self.bits == 32 else np.uint64)

    def encode(self, update: np.ndarray, weight: int, rng: np.random.Generator) -> np.ndarray:
        """[w, w·x] mod 2^bits; the caller clipped x (checked here) and w is in 1..max_weight."""
        if not 1 <= weight <= self.max_weight:
            raise ValueError(f"weight {weight} outside 1..{self.max_weight}")
        x = np.asarray(update, dtype=np.float64).ravel()
        if not np.all(np.isfinite(x)) or np.linalg.norm(x) > self.clip * (1 + 1e-9):
            raise ValueError("update not clipped to the encoding's norm (or not finite)")
        if self.noise_std > 0:  # its share of the DP noise, added on the device: the server never sees x bare
            x = x + rng.normal(0.0, self.noise_std, x.shape)
        scaled = np.concatenate([[float(weight)], weight * x]) * 2.0 ** self.frac_bits
        rounded = np.floor(scaled + rng.random(scaled.shape)).astype(np.int64)  # stochastic: unbiased
        return self.wrap(rounded)

    def wrap(self, signed: np.ndarray) -> np.ndarray:
        """Signed int64 to its residue mod 2^bits."""
        if self.bits == 64:
            return signed.view(np.uint64)
        return np.mod(signed, 1 << 32).astype(np.uint32)

    def decode_sum(self, total: np.ndarray) -> tuple[float, np.ndarray]:
        """(Σw, Σ w·x) from the unmasked sum mod 2^bits."""
        if self.bits == 64:
            signed = total.astype(np.uint64).view(np.int64).astype(np.float64)
        else:
            t = total.astype(np.int64)
            signed = np.where(t >= 1 << 31, t - (1 << 32), t).astype(np.float64)
        signed /= 2.0 ** self.frac_bits
        return float(round(signed[0])), signed[1:]

    def mean_error_bound(self, devices: int, weight_sum: float) -> float:
        """Largest |decoded weighted mean − exact weighted mean| per coordinate: each device's
        rounding moves its coordinate by under one unit of 2^-frac_bits."""
        return devices / (weight_sum * 2.0 ** self.frac_bits)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


NOISE_TAIL = 8.0  # a coordinate's noise stays within 8 standard deviations (probability 1 - 1e-15)


def choose(max_devices: int, clip: float, max_weight: int, precision_bits: int = 16,
           noise_std: float = 0.0) -> Encoding:
    """The smaller modulus whose signed half holds the largest possible sum at `precision_bits`
    fractional bits; 2^64 with as many fractional bits as fit when 2^32 cannot. With distributed
    DP a coordinate is within clip + NOISE_TAIL·noise_std."""
    if max_devices < 1 or max_weight < 1 or not clip > 0 or not 1 <= precision_bits <= 40 or not noise_std >= 0:
        raise ConfigError("secure aggregation needs devices ≥ 1, max_weight ≥ 1, clip > 0, precision 1..40 bits")
    reach = max(clip + NOISE_TAIL * noise_std, 1.0)
    for bits in (32, 64):
        # n·(W·C·2^f + 1) < 2^(bits-1): the magnitude of a sum of n rounded coordinates (and of Σw·2^f)
        headroom = bits - 1 - math.log2(max_devices) - math.log2(max_weight * reach) - 1
        frac_bits = min(math.floor(headroom), 52 - math.ceil(math.log2(max_weight * reach + 1)))
        if frac_bits >= precision_bits:
            return Encoding(bits, frac_bits, clip, max_weight, max_devices, noise_std)
    raise ConfigError(f"{max_devices} devices of weight ≤ {max_weight} and clip {clip} do not fit 2^64 "
                      f"at {precision_bits} fractional bits")


@dataclasses.dataclass(frozen=True)
class Unchecked(Encoding):
    """A device that ignores its clip: what a malicious device can send, since masks hide it. For
    tests and the bench's measure of what one such device can still do."""

    def encode(self, update: np.ndarray, weight: int, rng: np.random.Generator) -> np.ndarray:
        x = np.asarray(update, dtype=np.float64).ravel()
        if self.noise_std > 0:
            x = x + rng.normal(0.0, self.noise_std, x.shape)
        scaled = np.concatenate([[float(weight)], weight * x]) * 2.0 ** self.frac_bits
        return self.wrap(np.floor(scaled + rng.random(scaled.shape)).astype(np.int64))
