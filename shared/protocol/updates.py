"""Encoding an update, and the server-side way in: put the object, then enqueue its claim check.

Devices go through the gateway (`fleettune.DeviceClient`) and hold no credentials for this;
`submit_update` is for processes that hold the server's credentials (tests, benchmarks, tools).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

import numpy as np
from safetensors.numpy import save

from fleettune.shared import keys
from fleettune.shared.protocol.envelope import Envelope
from fleettune.shared.storage import ObjectStore


def encode_update(arrays: Mapping[str, np.ndarray]) -> bytes:
    """safetensors bytes of an adapter delta (PEFT key names; float32, float16 or bfloat16)."""
    return save({name: np.ascontiguousarray(a) for name, a in arrays.items()})


def submit_update(store: ObjectStore, enqueue: Callable[[bytes], None], *, federation: str, round_no: int,
                  device: str, blob: bytes, base_version: int, num_samples: int,
                  train_seconds: float = 0.0, metrics: Mapping[str, float] | None = None) -> Envelope:
    """Upload first, enqueue second: a worker never sees an envelope whose object is not there yet."""
    key = keys.update_object(federation, round_no, device)
    store.put(key, blob)
    env = Envelope(
        federation=federation, round=round_no, device=device, object_key=key,
        sha256=hashlib.sha256(blob).hexdigest(), num_samples=num_samples,
        base_version=base_version, train_seconds=train_seconds, metrics=dict(metrics or {}),
    )
    enqueue(env.encode())
    return env
