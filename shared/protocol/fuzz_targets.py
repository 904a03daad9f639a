"""The functions fuzzing drives: every input ends in a result or a named rejection, never anything else.

Shared by the hypothesis tests (tests/unit/test_fuzz.py, 10^4 examples in CI) and the long run
(`python bench/fuzz.py --inputs 1000000`).
"""

from __future__ import annotations

import json
import struct

from fleettune.shared.protocol.envelope import decode
from fleettune.shared.errors import Rejected
from fleettune.shared.protocol.compression import read_update
from fleettune.shared.protocol.safetensors_reader import parse

SPEC = {"a.lora_A.weight": (2, 3), "a.lora_B.weight": (3, 2)}
HEADER_CAP = 4096


def reader_outcome(buf: bytes) -> str:
    """'ok' or the rejection reason; any other exception is a bug the fuzzer reports."""
    try:
        out = parse(buf, SPEC, HEADER_CAP)
    except Rejected as rej:
        return rej.reason.value
    assert out.keys() == SPEC.keys() and all(tuple(t.shape) == SPEC[k] for k, t in out.items())
    return "ok"


def coded_outcome(buf: bytes) -> str:
    """The compressed-update reader (any encoding): 'ok' or the rejection reason."""
    try:
        out, _ = read_update(buf, SPEC, HEADER_CAP)
    except Rejected as rej:
        return rej.reason.value
    assert out.keys() == SPEC.keys() and all(tuple(t.shape) == SPEC[k] for k, t in out.items())
    return "ok"


def envelope_outcome(raw: bytes) -> str:
    try:
        decode(raw, 4096)
    except Rejected as rej:
        return rej.reason.value
    return "ok"


def container(header: dict | bytes, data: bytes) -> bytes:
    """A safetensors file from a header (a dict to serialise, or raw bytes) and a data region."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data
