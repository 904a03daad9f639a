"""Published global adapters: an immutable PEFT directory plus manifest per version, and a pointer."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from fleettune.shared import keys
from fleettune.shared.protocol.adapter_spec import AdapterSpec
from fleettune.shared.errors import ObjectNotFound, StateError
from fleettune.shared.protocol.safetensors_reader import parse
from fleettune.shared.storage import ObjectStore

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
MANIFEST_FILE = "manifest.json"
OPTIMIZER_FILE = "server_optimizer.safetensors"  # a stateful server optimizer's state after this version
CONTROL_FILE = "scaffold_control.safetensors"  # SCAFFOLD's server control variate, which devices download


def encode_weights(weights: Mapping[str, torch.Tensor]) -> bytes:
    return save_safetensors({k: v.to(torch.float32).contiguous() for k, v in sorted(weights.items())})


def publish(store: ObjectStore, fed: str, version: int, weights: Mapping[str, torch.Tensor],
            spec: AdapterSpec, fields: dict[str, Any], optimizer_state: Mapping[str, torch.Tensor] | None = None,
            tiers: Mapping[int, tuple[Mapping[str, torch.Tensor], AdapterSpec]] | None = None,
            control: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Write version `version` and then point `current.json` at it; returns the manifest written.

    The content is a pure function of its inputs, so a redone close computes identical bytes and
    leaves the version as it is; different bytes for an existing version are refused. The pointer
    is written last and only moves forward: a reader that follows it finds a complete version.
    """
    blob = encode_weights(weights)
    prefix = keys.version_prefix(fed, version)
    sha256 = hashlib.sha256(blob).hexdigest()
    written = dict(fields, federation=fed, version=version, adapter_sha256=sha256, num_parameters=spec.num_parameters)
    state_blob = encode_weights(optimizer_state) if optimizer_state else None
    if state_blob is not None:
        written["server_optimizer_sha256"] = hashlib.sha256(state_blob).hexdigest()
    control_blob = encode_weights(control) if control else None
    if control_blob is not None:
        written["scaffold_control_sha256"] = hashlib.sha256(control_blob).hexdigest()
    tier_blobs = {rank: (encode_weights(w), tier_spec) for rank, (w, tier_spec) in sorted((tiers or {}).items())}
    if tier_blobs:
        written["ranks"] = {str(rank): hashlib.sha256(blob).hexdigest() for rank, (blob, _) in tier_blobs.items()}
    try:  # conditional: a version number is never written twice with different bytes
        existing = manifest(store, fed, version)
    except ObjectNotFound:
        existing = None
    if existing is not None and existing.get("adapter_sha256") != sha256:
        raise StateError(f"{fed} version {version} exists with other bytes; refusing to overwrite it")
    if existing is None:
        store.put(f"{prefix}/{ADAPTER_FILE}", blob)
        store.put(f"{prefix}/{CONFIG_FILE}", _json(spec.peft_config), "application/json")
        if state_blob is not None:
            store.put(f"{prefix}/{OPTIMIZER_FILE}", state_blob)
        if control_blob is not None:
            store.put(f"{prefix}/{CONTROL_FILE}", control_blob)
        for rank, (blob, tier_spec) in tier_blobs.items():
            store.put(f"{keys.tier_prefix(fed, version, rank)}/{ADAPTER_FILE}", blob)
            store.put(f"{keys.tier_prefix(fed, version, rank)}/{CONFIG_FILE}", _json(tier_spec.peft_config),
                      "application/json")
        store.put(f"{prefix}/{MANIFEST_FILE}", _json(written), "application/json")  # last: the version is whole
    point_forward(store, fed, version)
    return existing or written  # a redone close: the version stands, its evaluation included


def point_forward(store: ObjectStore, fed: str, version: int) -> None:
    """Point `current.json` at `version` if it is newer than the one it names: it never moves back."""
    try:
        newest = current_version(store, fed)
    except ObjectNotFound:
        newest = -1
    if version > newest:
        store.put(keys.current_pointer(fed), _json({"version": version, "prefix": keys.version_prefix(fed, version)}),
                  "application/json")


def add_evaluation(store: ObjectStore, fed: str, version: int, evaluation: dict[str, Any]) -> None:
    """Add the evaluation to a version's manifest; the adapter files themselves never change."""
    key = f"{keys.version_prefix(fed, version)}/{MANIFEST_FILE}"
    store.put(key, _json(dict(manifest(store, fed, version), evaluation=evaluation)), "application/json")


def load_weights(store: ObjectStore, fed: str, version: int, spec: AdapterSpec,
                 max_bytes: int, max_header_bytes: int) -> dict[str, torch.Tensor]:
    blob = store.get(f"{keys.version_prefix(fed, version)}/{ADAPTER_FILE}", max_bytes)
    return parse(blob, spec.tensors, max_header_bytes)


def load_tier_weights(store: ObjectStore, fed: str, version: int, rank: int, spec: AdapterSpec,
                      max_bytes: int, max_header_bytes: int) -> dict[str, torch.Tensor]:
    """A version's adapter at a tier's rank, checked against the sha256 its manifest recorded."""
    expected = (manifest(store, fed, version).get("ranks") or {}).get(str(rank))
    if expected is None:
        raise ObjectNotFound(f"{fed} version {version} has no rank-{rank} adapter")
    blob = store.get(f"{keys.tier_prefix(fed, version, rank)}/{ADAPTER_FILE}", max_bytes)
    if hashlib.sha256(blob).hexdigest() != expected:
        raise StateError(f"{fed} version {version}: the rank-{rank} adapter does not match its manifest")
    return parse(blob, spec.tensors, max_header_bytes)


def publish_variant(store: ObjectStore, fed: str, version: int, tier: str, weights: Mapping[str, torch.Tensor],
                    spec: AdapterSpec, fields: dict[str, Any]) -> dict[str, Any]:
    """Write a version distilled onto a tier's own base beside the version (once: redone, it stands)."""
    prefix = keys.variant_prefix(fed, version, tier)
    try:
        return json.loads(store.get(f"{prefix}/{MANIFEST_FILE}", 1024 * 1024))
    except ObjectNotFound:
        pass
    blob = encode_weights(weights)
    written = dict(fields, federation=fed, version=version, tier=tier, num_parameters=spec.num_parameters,
                   adapter_sha256=hashlib.sha256(blob).hexdigest())
    store.put(f"{prefix}/{ADAPTER_FILE}", blob)
    store.put(f"{prefix}/{CONFIG_FILE}", _json(spec.peft_config), "application/json")
    store.put(f"{prefix}/{MANIFEST_FILE}", _json(written), "application/json")  # last: the variant is whole
    return written


def load_optimizer_state(store: ObjectStore, fed: str, version: int, max_bytes: int) -> dict[str, torch.Tensor]:
    """The server optimizer's state as of `version`; empty for a version that has none (v0, or
    a stateless optimizer), which starts the optimizer afresh."""
    return _load_state(store, fed, version, OPTIMIZER_FILE, "server_optimizer_sha256", max_bytes)


def load_control(store: ObjectStore, fed: str, version: int, max_bytes: int) -> dict[str, torch.Tensor]:
    """SCAFFOLD's server control variate as of `version`; empty (zero) for a version that has none."""
    return _load_state(store, fed, version, CONTROL_FILE, "scaffold_control_sha256", max_bytes)


def _load_state(store: ObjectStore, fed: str, version: int, name: str, field: str, max_bytes: int):
    expected = manifest(store, fed, version).get(field)
    if expected is None:
        return {}
    from safetensors.torch import load

    blob = store.get(f"{keys.version_prefix(fed, version)}/{name}", max_bytes)
    if hashlib.sha256(blob).hexdigest() != expected:
        raise StateError(f"{fed} version {version}: {name} does not match its manifest")
    return load(blob)


def manifest(store: ObjectStore, fed: str, version: int) -> dict[str, Any]:
    return json.loads(store.get(f"{keys.version_prefix(fed, version)}/{MANIFEST_FILE}", 16 * 1024 * 1024))


def current_version(store: ObjectStore, fed: str) -> int:
    return int(json.loads(store.get(keys.current_pointer(fed), 4096))["version"])


def download(store: ObjectStore, fed: str, version: int, directory, rank: int | None = None) -> None:
    """Copy one version into a local directory that PeftModel.from_pretrained loads; `rank`: a
    tier's lower-rank adapter instead of the global one."""
    from pathlib import Path

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    prefix = keys.tier_prefix(fed, version, rank) if rank else keys.version_prefix(fed, version)
    for name in (ADAPTER_FILE, CONFIG_FILE):
        (out / name).write_bytes(store.get(f"{prefix}/{name}"))
    (out / MANIFEST_FILE).write_bytes(store.get(f"{keys.version_prefix(fed, version)}/{MANIFEST_FILE}"))


def _json(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True).encode()
