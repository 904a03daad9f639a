"""The received-message ledger on fakeredis: what has no outcome is re-driven, with backoff, until it has."""

import fakeredis
import msgpack
import pytest

from fleettune.shared import keys
from fleettune.shared.envelope import decode
from fleettune.shared.errors import RejectReason, Rejected
from fleettune.shared.ledger import Ledger


def _entry(raw: bytes, at: float) -> dict:
    return {"received_at": at, "federation": "f", "device": "d", "round": 1, "envelope": raw}


def test_messages_without_an_outcome_are_redriven_with_backoff_until_settled():
    r = fakeredis.FakeRedis()
    ledger = Ledger(r, redrive_after_s=10)
    assert ledger.record("m1", _entry(b"one", 100.0), 100.0) is None
    assert ledger.record("m2", _entry(b"two", 100.0), 100.0) is None
    assert ledger.record("m1", _entry(b"one", 105.0), 105.0)["received_at"] == 100.0  # a repeat
    sent = []
    enqueue = lambda raw, at: sent.append((raw, at))  # noqa: E731
    assert ledger.redrive(109.0, enqueue) == (0, 0)  # not due yet
    r.set(keys.message("m2"), "accepted")  # m2 got its outcome; m1 was lost by the broker
    assert ledger.redrive(110.0, enqueue) == (1, 1)
    assert sent == [(b"one", 100.0)] and ledger.pending() == 1
    assert ledger.redrive(129.0, enqueue) == (0, 0)  # the next try waits 2 x 10 s
    assert ledger.redrive(130.0, enqueue) == (1, 0)
    r.set(keys.message("m1"), "rejected:non_finite")
    assert ledger.redrive(1000.0, enqueue) == (0, 1) and ledger.pending() == 0
    assert int(r.hget(keys.GLOBAL_STATS, "redriven")) == 2


def test_forgetting_an_entry_lets_the_same_submission_in_again():
    ledger = Ledger(fakeredis.FakeRedis(), redrive_after_s=10)
    ledger.record("m1", _entry(b"one", 1.0), 1.0)
    ledger.forget("m1")
    assert ledger.record("m1", _entry(b"one", 2.0), 2.0) is None and ledger.pending() == 1


@pytest.mark.parametrize("version", [True, 1.0, "1"])
def test_an_envelope_whose_version_is_not_the_integer_1_is_refused(version):
    raw = msgpack.packb({"v": version, "federation": "f", "round": 1, "device": "d", "object_key": "k",
                         "sha256": "0" * 64, "num_samples": 1, "base_version": 0})
    with pytest.raises(Rejected) as refused:
        decode(raw, 4096)
    assert refused.value.reason is RejectReason.UNSUPPORTED_SCHEMA
