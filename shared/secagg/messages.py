"""What the stages of SecAgg+ exchange, the context that binds them, and the reasons they are refused.

Every signed or encrypted byte string starts with the attempt's context
(federation, round, attempt), so a signature or ciphertext from one attempt is worthless in another:
a replay fails its check with `bad_signature` or `bad_ciphertext`.
"""

from __future__ import annotations

import dataclasses
import enum

import msgpack

from fleettune.shared.errors import FleettuneError

MAX_MESSAGE_BYTES = 256 * 1024  # a stage's message (350 neighbours' sealed shares is ~70 KB); masked vectors go to the store


class Reason(str, enum.Enum):
    """Closed set of reasons a stage message is refused; a metrics label."""

    MALFORMED = "malformed"  # not msgpack of the stage's shape, or a field of the wrong size
    STAGE_CLOSED = "stage_closed"  # the attempt is not at this stage (too early, too late)
    NOT_IN_STAGE = "not_in_stage"  # the device is not among this stage's participants
    DUPLICATE_STAGE = "duplicate_stage"  # the device already answered this stage
    UNKNOWN_IDENTITY = "unknown_identity"  # no identity key is registered for the device
    BAD_SIGNATURE = "bad_signature"  # forged, or replayed from another round or attempt
    WRONG_RECIPIENT = "wrong_recipient"  # a share addressed to a device that is not a live neighbour
    BAD_CIPHERTEXT = "bad_ciphertext"  # a share that fails authentication, or says it is from or for another
    BAD_VECTOR = "bad_vector"  # a masked vector of the wrong length or modulus
    BOTH_SHARES = "both_shares"  # both kinds of share for one device: its update would be exposed
    TOO_FEW_SHARES = "too_few_shares"  # fewer than the threshold: that secret cannot be rebuilt
    INCONSISTENT = "inconsistent"  # lists from the server that disagree (survivors, dropped)
    BAD_SHARES = "bad_shares"  # shares that rebuild a secret which does not match its commitment
    OUT_OF_RANGE = "out_of_range"  # an unmasked sum no honest cohort can produce (weights or norm too large)


class SecAggError(FleettuneError):
    """A stage message refused, with its named reason."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class Context:
    federation: str
    round: int
    attempt: int

    def label(self, purpose: str, *parts: str) -> bytes:
        """Bytes that bind a signature, a key derivation or a ciphertext to this attempt and purpose."""
        return msgpack.packb(["fleettune-secagg/v1", self.federation, self.round, self.attempt, purpose, *parts])


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(raw: bytes, shape: type = dict):
    """msgpack of `shape` (dict or list) within MAX_MESSAGE_BYTES; SecAggError(malformed) otherwise."""
    if not isinstance(raw, bytes | bytearray) or len(raw) > MAX_MESSAGE_BYTES:
        raise SecAggError(Reason.MALFORMED, "not bytes, or larger than a stage message may be")
    try:
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=MAX_MESSAGE_BYTES,
                              max_str_len=1 << 16, max_array_len=1 << 16, max_map_len=1 << 16)
    except Exception as exc:  # msgpack raises several types for hostile bytes
        raise SecAggError(Reason.MALFORMED, f"not msgpack: {type(exc).__name__}") from None
    if not isinstance(obj, shape):
        raise SecAggError(Reason.MALFORMED, f"expected a {shape.__name__}")
    return obj


def field(obj: dict, name: str, kind: type, size: int | None = None):
    """obj[name] of `kind` (and `size` bytes for bytes); SecAggError(malformed) naming the field."""
    value = obj.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise SecAggError(Reason.MALFORMED, f"{name!r} missing or not {kind.__name__}")
    if size is not None and len(value) != size:
        raise SecAggError(Reason.MALFORMED, f"{name!r} is {len(value)} bytes, {size} expected")
    return value
