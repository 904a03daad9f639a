"""The device → queue message: a small msgpack claim check that points at the update object."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import msgpack

from fleettune.shared import keys
from fleettune.shared.errors import RejectReason, Rejected

SCHEMA_VERSION = 1
MAX_METRICS = 8
_HEX = frozenset("0123456789abcdef")
_FIELDS = frozenset(
    {"v", "federation", "round", "device", "object_key", "sha256", "num_samples",
     "base_version", "train_seconds", "metrics"}
)


@dataclasses.dataclass(frozen=True)
class Envelope:
    federation: str
    round: int
    device: str
    object_key: str
    sha256: str
    num_samples: int
    base_version: int
    train_seconds: float = 0.0
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)

    def encode(self) -> bytes:
        body = dataclasses.asdict(self)
        body["v"] = SCHEMA_VERSION
        return msgpack.packb(body, use_bin_type=True)


def digest(raw: bytes) -> str:
    """Identity of a message for deduplication: the same bytes delivered twice are one message."""
    return hashlib.sha256(raw).hexdigest()


def decode(raw: Any, max_bytes: int) -> Envelope:
    """Parse and validate an envelope; raise Rejected with a named reason on anything off."""
    if not isinstance(raw, (bytes, bytearray)):
        raise Rejected(RejectReason.MALFORMED_ENVELOPE, f"envelope must be bytes, got {type(raw).__name__}")
    if len(raw) > max_bytes:
        raise Rejected(RejectReason.ENVELOPE_TOO_LARGE, f"{len(raw)} bytes > {max_bytes}")
    try:
        body = msgpack.unpackb(
            bytes(raw), raw=False, strict_map_key=True, max_str_len=256, max_bin_len=0,
            max_array_len=0, max_map_len=len(_FIELDS) + MAX_METRICS, max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises a zoo of types for bad bytes
        raise Rejected(RejectReason.MALFORMED_ENVELOPE, f"not msgpack: {type(exc).__name__}") from None
    if not isinstance(body, dict):
        raise Rejected(RejectReason.MALFORMED_ENVELOPE, "envelope is not a map")
    version = body.get("v")
    if not isinstance(version, int) or isinstance(version, bool) or version != SCHEMA_VERSION:  # True == 1
        raise Rejected(RejectReason.UNSUPPORTED_SCHEMA, f"schema {body.get('v')!r}, expected {SCHEMA_VERSION}")
    unknown = set(body) - _FIELDS
    if unknown:
        raise Rejected(RejectReason.MALFORMED_ENVELOPE, f"unknown fields {sorted(unknown)[:4]}")
    return Envelope(
        federation=keys.check_id(body.get("federation"), "federation"),
        round=_int(body, "round", minimum=1),
        device=keys.check_id(body.get("device"), "device"),
        object_key=_str(body, "object_key"),
        sha256=_sha256(body.get("sha256")),
        num_samples=_int(body, "num_samples", minimum=0),
        base_version=_int(body, "base_version", minimum=0),
        train_seconds=_float(body.get("train_seconds", 0.0), "train_seconds", minimum=0.0),
        metrics=_metrics(body.get("metrics", {})),
    )


def _int(body: dict, name: str, minimum: int) -> int:
    value = body.get(name)
    # bool is an int subclass; a device sending `true` for a count is malformed.
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value < 2**53:
        raise Rejected(RejectReason.MALFORMED_ENVELOPE, f"{name} must be an integer >= {minimum}")
    return value


def _str(body: dict, name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise Rejected(RejectReason.MALFORMED_ENVELOPE, f"{name} must be a non-empty string")
    return value


def _float(value: Any, name: str, minimum: float | None = None) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise Rejected(RejectReason.MALFORMED_ENVELOPE, f"{name} must be a finite number")
    if minimum is not None and value < minimum:
        raise Rejected(RejectReason.MALFORMED_ENVELOPE, f"{name} must be >= {minimum}")
    return float(value)


def _sha256(value: Any) -> str:
    if not isinstance(value, str) or len(value) != 64 or not set(value) <= _HEX:
        raise Rejected(RejectReason.MALFORMED_ENVELOPE, "sha256 must be 64 lowercase hex digits")
    return value


def _metrics(value: Any) -> dict[str, float]:
    if not isinstance(value, dict) or len(value) > MAX_METRICS:
        raise Rejected(RejectReason.MALFORMED_ENVELOPE, f"metrics must be a map of at most {MAX_METRICS}")
    out = {}
    for name, number in value.items():
        if not isinstance(name, str) or not 0 < len(name) <= 32:
            raise Rejected(RejectReason.MALFORMED_ENVELOPE, "metric names must be short strings")
        out[name] = _float(number, f"metrics.{name}")
    return out
