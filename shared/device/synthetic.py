"""The load generator's devices: synthetic updates with the exact layout of a federation's adapter."""

from __future__ import annotations

import dataclasses
import numpy as np

from fleettune.shared.protocol.adapter_spec import AdapterSpec
from fleettune.device import DeviceClient
from fleettune.shared.protocol.updates import encode_update


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


def send_update(client: DeviceClient, spec: AdapterSpec, seed: int, index: int, dev: SyntheticDevice) -> dict:
    """One synthetic device's round through the gateway: check in, upload, submit; returns the receipt."""
    plan = client.check_in()
    blob = encode_update(synthetic_delta(spec, seed, plan["round"], index, dev.scale))
    return client.send(plan, blob, num_samples=dev.num_samples, metrics={"loss": 0.0, "steps": 0})
