"""The load generator's devices: synthetic updates with the exact layout of a federation's adapter."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from shared.adapter_spec import AdapterSpec
from shared.submit import encode_update, submit_update
from shared.storage import ObjectStore


@dataclasses.dataclass(frozen=True)
class SyntheticDevice:
    device: str
    num_samples: int
    scale: float  # typical update magnitude per element; a spread of scales exercises clipping


def devices(n: int, seed: int, prefix: str = "dev") -> list[SyntheticDevice]:
    rng = np.random.default_rng(seed)
    return [
        SyntheticDevice(f"{prefix}-{i:04d}", int(rng.integers(8, 512)), float(rng.choice([1e-3, 3e-3, 1e-2])))
        for i in range(n)
    ]


def synthetic_delta(spec: AdapterSpec, seed: int, round_no: int, device_index: int, scale: float,
                    dtype: str = "float32") -> dict[str, np.ndarray]:
    """A deterministic pseudo-update: the same (seed, round, device) gives the same bytes."""
    rng = np.random.default_rng([seed, round_no, device_index])
    return {name: (rng.standard_normal(shape, dtype=np.float32) * scale).astype(dtype)
            for name, shape in spec.tensors.items()}


def run_round(store: ObjectStore, enqueue: Callable[[bytes], None], spec: AdapterSpec, federation: str,
              round_no: int, base_version: int, fleet: list[SyntheticDevice], seed: int) -> Iterator[str]:
    """Upload and enqueue one update per device; yields each device id as it is sent."""
    for index, dev in enumerate(fleet):
        blob = encode_update(synthetic_delta(spec, seed, round_no, index, dev.scale))
        submit_update(store, enqueue, federation=federation, round_no=round_no, device=dev.device, blob=blob,
                      base_version=base_version, num_samples=dev.num_samples, train_seconds=0.0,
                      metrics={"loss": 0.0, "steps": 0})
        yield dev.device
