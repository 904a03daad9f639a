"""The received-message ledger on fakeredis: what has no outcome is re-driven, with backoff, until it has."""

import fakeredis
import msgpack
import pytest

from fleettune.shared import keys
from fleettune.shared.protocol.envelope import decode
from fleettune.shared.errors import RejectReason, Rejected
from fleettune.shared.state.ledger import Ledger


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


def test_only_lost_messages_are_redriven_never_one_queued_or_held_by_a_worker():
    import hashlib
    import json

    from fleettune.shared.state import broker
    from fleettune.workers.worker.app import make_app
    from fleettune.workers.worker.publish import RedisPublisher

    r = fakeredis.FakeRedis()
    ledger = Ledger(r, redrive_after_s=10)
    raws = {name: name.encode() * 8 for name in ("lost", "held", "queued")}
    digests = {name: hashlib.sha256(raw).hexdigest() for name, raw in raws.items()}
    for at, name in enumerate(raws):
        ledger.record(digests[name], _entry(raws[name], 100.0 + at), 100.0 + at)
    # the broker as kombu leaves it: "held" delivered to a worker (unacked), "queued" still waiting
    publisher = RedisPublisher(make_app(broker_url="memory://"))
    r.lpush("fleettune.ingest", publisher.message(raws["queued"], 102.0))
    r.hset(broker.UNACKED, "tag-1", json.dumps([json.loads(publisher.message(raws["held"], 101.0)), "", "q"]))
    assert broker.oldest_sent_at(r, "fleettune.ingest") == 102.0
    assert broker.held_digests(r) == {digests["held"]}

    sent = []
    redriven = ledger.redrive(200.0, lambda raw, at: sent.append(raw), held=broker.held_digests(r),
                              queued_since=broker.oldest_sent_at(r, "fleettune.ingest"))
    assert redriven == (1, 0) and sent == [raws["lost"]]
    assert not r.hexists(keys.REDRIVES, digests["held"]) and not r.hexists(keys.REDRIVES, digests["queued"])
    assert ledger.redrive(205.0, sent.append) == (0, 0)  # the others are looked at again later
    r.delete("fleettune.ingest", broker.UNACKED)  # the worker that held one died; the queue was lost
    assert ledger.redrive(210.0, lambda raw, at: sent.append(raw)) == (2, 0)


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
