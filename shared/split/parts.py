"""The split server's part, published as versions of its own beside the federation's.

A version is a PEFT adapter of the server's layers only (`layers_to_transform`), written once
under federations/{fed}/split/{version:06d}/, then recorded in Redis as the newest. The devices'
part is the federation's own versions (the round pipeline averages it); the two together are the
whole model (shared/split/device.py `combined`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import torch

from fleettune.shared import keys
from fleettune.shared.protocol import versions
from fleettune.shared.errors import Rejected, StateError
from fleettune.shared.protocol.safetensors_reader import parse
from fleettune.shared.split.config import SplitConfig


def peft_config(config: SplitConfig, adapter, layers: range) -> dict:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": config.base_model,
            "r": adapter.rank, "lora_alpha": adapter.alpha, "lora_dropout": adapter.dropout,
            "target_modules": sorted(adapter.target_modules), "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "layers_to_transform": list(layers)}


LIFT_FILE = "bottleneck_lift.safetensors"  # the server's learned lift out of the bottleneck, if any


def publish(client, store, fed: str, weights: Mapping[str, torch.Tensor], peft: dict, fields: dict,
            lift: Mapping[str, torch.Tensor] | None = None) -> int:
    """Write the next version of the server part; returns its number."""
    version = int(client.hincrby(keys.split_state(fed), "published", 1))
    prefix = keys.split_prefix(fed, version)
    blob = versions.encode_weights(weights)
    store.put(f"{prefix}/{versions.ADAPTER_FILE}", blob)
    store.put(f"{prefix}/{versions.CONFIG_FILE}", json.dumps(peft, indent=2).encode(), "application/json")
    manifest = dict(fields, federation=fed, version=version, adapter_sha256=hashlib.sha256(blob).hexdigest())
    if lift:
        lift_blob = versions.encode_weights(lift)
        store.put(f"{prefix}/{LIFT_FILE}", lift_blob)
        manifest["lift_sha256"] = hashlib.sha256(lift_blob).hexdigest()
    store.put(f"{prefix}/{versions.MANIFEST_FILE}", json.dumps(manifest, indent=2).encode(), "application/json")
    client.hset(keys.split_state(fed), "version", version)  # last: a reader finds a whole version
    return version


def load(client, store, fed: str, shapes: Mapping[str, tuple[int, ...]],
         lift_shapes: Mapping[str, tuple[int, ...]] | None = None
         ) -> tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(newest version, its weights, its bottleneck lift), checked against its manifest; (0, {}, {})
    before the first. A lift of other shapes (the bottleneck changed since) is not loaded."""
    version = int(client.hget(keys.split_state(fed), "version") or 0)
    if not version:
        return 0, {}, {}
    prefix = keys.split_prefix(fed, version)
    manifest = json.loads(store.get(f"{prefix}/{versions.MANIFEST_FILE}", 1 << 20))

    def checked(name: str, digest: str) -> bytes:
        blob = store.get(f"{prefix}/{name}", 1 << 30)
        if hashlib.sha256(blob).hexdigest() != digest:
            raise StateError(f"{fed} split part {version} does not match its manifest")
        return blob

    weights = {k: v.clone() for k, v in parse(checked(versions.ADAPTER_FILE, manifest["adapter_sha256"]),
                                                shapes, 1 << 20).items()}
    lift = {}
    if lift_shapes and "lift_sha256" in manifest:
        try:
            lift = {k: v.clone() for k, v in parse(checked(LIFT_FILE, manifest["lift_sha256"]), lift_shapes,
                                                   1 << 20).items()}
        except Rejected:
            lift = {}
    return version, weights, lift
