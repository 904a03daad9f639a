import dataclasses
from pathlib import Path

import msgpack
import pytest

from fleettune.shared import keys
from fleettune.shared.protocol.envelope import Envelope, decode
from fleettune.shared.errors import Rejected, RejectReason

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "envelope_v1.msgpack"
EXPECTED = Envelope(
    federation="clinic-notes", round=3, device="phone-0042",
    object_key="updates/clinic-notes/000003/phone-0042.safetensors",
    sha256="9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    num_samples=128, base_version=2, train_seconds=41.5, metrics={"loss": 2.25, "steps": 16.0},
)


def test_golden_envelope_decodes_to_the_documented_fields():
    assert decode(GOLDEN.read_bytes(), 4096) == EXPECTED


def test_encoding_is_pinned_byte_for_byte():
    as_sent = dataclasses.replace(EXPECTED, metrics={"loss": 2.25, "steps": 16})  # a device sends steps as int
    assert as_sent.encode() == GOLDEN.read_bytes()


def test_object_key_format_is_pinned():
    assert keys.update_object("clinic-notes", 3, "phone-0042") == EXPECTED.object_key
    assert keys.version_prefix("clinic-notes", 12) == "federations/clinic-notes/versions/000012"


def _body(**changes):
    body = msgpack.unpackb(GOLDEN.read_bytes())
    body.update(changes)
    return {k: v for k, v in body.items() if v is not ...}


@pytest.mark.parametrize("changes,reason", [
    ({"v": 2}, RejectReason.UNSUPPORTED_SCHEMA),
    ({"v": ...}, RejectReason.UNSUPPORTED_SCHEMA),
    ({"round": True}, RejectReason.MALFORMED_ENVELOPE),
    ({"round": 0}, RejectReason.MALFORMED_ENVELOPE),
    ({"round": 2**60}, RejectReason.MALFORMED_ENVELOPE),
    ({"num_samples": -1}, RejectReason.MALFORMED_ENVELOPE),
    ({"num_samples": 1.5}, RejectReason.MALFORMED_ENVELOPE),
    ({"device": "../../etc/passwd"}, RejectReason.MALFORMED_ENVELOPE),
    ({"device": "a" * 65}, RejectReason.MALFORMED_ENVELOPE),
    ({"federation": ...}, RejectReason.MALFORMED_ENVELOPE),
    ({"sha256": "XYZ"}, RejectReason.MALFORMED_ENVELOPE),
    ({"sha256": "A" * 64}, RejectReason.MALFORMED_ENVELOPE),
    ({"train_seconds": float("nan")}, RejectReason.MALFORMED_ENVELOPE),
    ({"train_seconds": -1.0}, RejectReason.MALFORMED_ENVELOPE),
    ({"metrics": {f"m{i}": 1.0 for i in range(9)}}, RejectReason.MALFORMED_ENVELOPE),
    ({"metrics": {"loss": "low"}}, RejectReason.MALFORMED_ENVELOPE),
    ({"tensors": b"\0" * 10}, RejectReason.MALFORMED_ENVELOPE),
])
def test_bad_fields_are_rejected_with_a_reason(changes, reason):
    with pytest.raises(Rejected) as err:
        decode(msgpack.packb(_body(**changes)), 4096)
    assert err.value.reason is reason


@pytest.mark.parametrize("raw", [b"", b"\xc1", b"\x93\x01\x02\x03", "text", None, msgpack.packb(1) + b"x"])
def test_not_msgpack_maps_are_malformed(raw):
    with pytest.raises(Rejected) as err:
        decode(raw, 4096)
    assert err.value.reason is RejectReason.MALFORMED_ENVELOPE


def test_oversized_envelopes_are_refused_before_parsing():
    with pytest.raises(Rejected) as err:
        decode(b"\x80" * 5000, 4096)
    assert err.value.reason is RejectReason.ENVELOPE_TOO_LARGE
