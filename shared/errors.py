"""The one exception tree of fleettune.

    FleettuneError
    ├── Rejected            a device's update is bad; permanent, never retried
    ├── ConfigError         a settings or federation config value is invalid
    ├── StateError          a federation or round is not in the state an operation needs
    ├── Refusal             the control plane refuses a request (HTTP status + a named code)
    └── StorageError
        ├── ObjectNotFound      the key does not exist (permanent)
        └── StorageUnavailable  the store did not answer (transient: retry with backoff)
"""

from __future__ import annotations

import enum


class RejectReason(str, enum.Enum):
    """Closed set of reasons an update is refused; reused as a metrics label."""

    # envelope
    MALFORMED_ENVELOPE = "malformed_envelope"
    ENVELOPE_TOO_LARGE = "envelope_too_large"
    UNSUPPORTED_SCHEMA = "unsupported_schema"
    # federation and round
    UNKNOWN_FEDERATION = "unknown_federation"
    NOT_SELECTED = "not_selected"
    STALE_ROUND = "stale_round"
    FUTURE_ROUND = "future_round"
    WRONG_BASE_VERSION = "wrong_base_version"
    TOO_FEW_SAMPLES = "too_few_samples"
    ALREADY_SUBMITTED = "already_submitted"
    # object
    BAD_OBJECT_KEY = "bad_object_key"
    OBJECT_MISSING = "object_missing"
    OBJECT_TOO_LARGE = "object_too_large"
    SHA256_MISMATCH = "sha256_mismatch"
    # safetensors container
    TRUNCATED = "truncated"
    HEADER_TOO_LARGE = "header_too_large"
    HEADER_INVALID = "header_invalid"
    INVALID_OFFSETS = "invalid_offsets"
    # tensors against the federation's adapter spec
    BAD_DTYPE = "bad_dtype"
    BAD_SHAPE = "bad_shape"
    UNEXPECTED_KEYS = "unexpected_keys"
    MISSING_KEYS = "missing_keys"
    NON_FINITE = "non_finite"
    BAD_LABEL = "bad_label"  # split learning: a token id outside the vocabulary
    # our own failure on this input: dead-lettered for a person to look at, never silently dropped
    INTERNAL_ERROR = "internal_error"
    # not an outcome: retries ran out during an outage; the ledger re-drives the message later
    RETRIES_EXHAUSTED = "retries_exhausted"


# Rejections of the update object's own bytes. A device's update key is write-once, so after one of
# these it has nothing else to send this round: it has reported. (After the others, such as
# too_few_samples or object_missing, a corrected envelope or a late upload can still be accepted.)
FINAL_FOR_THE_ROUND = frozenset({
    RejectReason.OBJECT_TOO_LARGE, RejectReason.TRUNCATED, RejectReason.HEADER_TOO_LARGE,
    RejectReason.HEADER_INVALID, RejectReason.INVALID_OFFSETS, RejectReason.BAD_DTYPE, RejectReason.BAD_SHAPE,
    RejectReason.UNEXPECTED_KEYS, RejectReason.MISSING_KEYS, RejectReason.NON_FINITE,
})


class FleettuneError(Exception):
    """Base of every error fleettune raises on purpose."""


class Rejected(FleettuneError):
    """An update (or envelope) is refused for a named reason."""

    def __init__(self, reason: RejectReason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail[:500]


class ConfigError(FleettuneError, ValueError):
    """A configuration value is missing or out of range."""


class StateError(FleettuneError):
    """A federation or round is not in the state the operation needs."""


class Refusal(FleettuneError):
    """A request the control plane refuses: an HTTP status and a stable, named code."""

    def __init__(self, status: int, code: str, detail: str = "", headers: dict[str, str] | None = None,
                 extra: dict | None = None) -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.status = status
        self.code = code
        self.detail = detail[:500]
        self.headers = headers or {}
        self.extra = extra or {}  # RFC 9457 extension members (a check-in's `serve` rides on its refusal)

    def with_extra(self, **extra) -> Refusal:
        return Refusal(self.status, self.code, self.detail, self.headers, dict(self.extra, **extra))


class StorageError(FleettuneError):
    """The object store failed."""


class ObjectNotFound(StorageError):
    """The key does not exist."""


class StorageUnavailable(StorageError):
    """The store could not be reached; worth retrying."""
