"""The one exception tree of fleettune.

    FleettuneError
    ├── Rejected            a device's update is bad; permanent, never retried
    ├── ConfigError         a settings or federation config value is invalid
    ├── StateError          a federation or round is not in the state an operation needs
    │   └── BufferClosing   an async update met its buffer closing (transient: retried)
    ├── Refusal             the control plane refuses a request (HTTP status + a named code)
    └── StorageError
        ├── ObjectNotFound      the key does not exist (permanent)
        └── StorageUnavailable  the store did not answer (transient: retry with backoff)
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping

from pydantic import ValidationError
from pydantic_core import ErrorDetails


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
    # async (buffered) rounds
    FUTURE_BASE_VERSION = "future_base_version"  # trained from a version not yet published
    TOO_STALE = "too_stale"  # trained from a version more than max_staleness versions old
    DUPLICATE_BASE_VERSION = "duplicate_base_version"  # a second update from a device for one base version
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
    BAD_ENCODING = "bad_encoding"  # a compressed update's encoding, density, scale or indices are invalid
    BAD_LABEL = "bad_label"  # split learning: a token id outside the vocabulary
    NORM_ABOVE_BOUND = "norm_above_bound"  # split learning: an example larger than the clip and its noise allow
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
    RejectReason.UNEXPECTED_KEYS, RejectReason.MISSING_KEYS, RejectReason.NON_FINITE, RejectReason.BAD_ENCODING,
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

    @classmethod
    def from_validation(cls, exc: ValidationError, name: Callable[[Loc], str] | None = None,
                        what: str = "") -> ConfigError:
        """One ConfigError for every error pydantic found, each as `name=value: what is allowed`
        (`FLEETTUNE_MAX_RETRIES='x': must be an integer`, `policy.min_updates=0: ...`).

        `name` turns an error's location into what the user wrote (default: the dotted field path)."""
        lines = [_described(error, name or dotted) for error in exc.errors()
                 if error["type"] != "default_factory_not_called"]  # a default that needed a value that failed
        return cls((f"{what}: " if what else "") + "; ".join(dict.fromkeys(lines)))


class StateError(FleettuneError):
    """A federation or round is not in the state the operation needs."""


class BufferClosing(StateError):
    """An async update arrived while its federation's buffer was closing: retried until the next
    buffer opens, never rejected (it did nothing wrong)."""


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


# --- pydantic's validation errors, in fleettune's words ----------------------------------------------

Loc = tuple[str | int, ...]

_BOOLEAN = "must be a boolean (true/false, 1/0, yes/no, on/off)"
_ALLOWED = {
    "int_parsing": "must be an integer", "int_type": "must be an integer", "int_from_float": "must be an integer",
    "float_parsing": "must be a number", "float_type": "must be a number", "finite_number": "must be finite",
    "bool_parsing": _BOOLEAN, "bool_type": _BOOLEAN,
    "greater_than": "must be > {gt}", "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}", "less_than_equal": "must be <= {le}",
    "literal_error": "must be {expected}", "enum": "must be {expected}",
    "string_type": "must be a string", "list_type": "must be a list", "tuple_type": "must be a list",
    "dict_type": "must be an object", "dataclass_type": "must be an object", "model_type": "must be an object",
    "dataclass_exact_type": "must be an object", "missing": "is required", "missing_argument": "is required",
    "extra_forbidden": "is not a known field", "unexpected_keyword_argument": "is not a known field",
}


def dotted(loc: Loc) -> str:
    return ".".join(str(part) for part in loc)


def allowed(error: ErrorDetails) -> str:
    """What a pydantic error says is allowed, as the rest of a sentence that starts with the value's name."""
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind in _ALLOWED:
        return _ALLOWED[kind].format(**ctx)
    message = error["msg"]  # a custom error's own, or pydantic's words ("input should be ...")
    return "i" + message[1:] if message.startswith("Input ") else message


def _described(error: ErrorDetails, name: Callable[[Loc], str]) -> str:
    loc, value, message = tuple(error["loc"]), error.get("input"), allowed(error)
    if error["type"] in ("value_error", "assertion_error") and isinstance(value, Mapping):
        # a constructor's own check (a dataclass's __post_init__): name the fields its message names
        named = {k: v for k, v in value.items()
                 if isinstance(k, str) and re.search(rf"\b{re.escape(k)}\b", message)}
        if len(named) != 1:
            values = ", ".join(f"{name((*loc, k))}={v!r}" for k, v in named.items())
            return f"{values}: {message}" if values else f"{name(loc)}: {message}" if loc else message
        (key, value), = named.items()
        loc = (*loc, key)
    if not loc:
        return message
    if error["type"] in ("missing", "missing_argument"):
        return f"{name(loc)}: {message}"
    return f"{name(loc)}={value!r}: {message}"
