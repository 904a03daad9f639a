"""Round state on fakeredis: the transactions that make accounting exactly-once."""

import fakeredis
import pytest

from shared.adapter_spec import LAYOUTS
from shared.errors import RejectReason, StateError
from shared.federation import FederationConfig, RoundPolicy
from shared.rounds import CLOSING, FAILED, WAIT, decide
from shared.state import ACCEPTED, REDELIVERED, FederationState, RoundInfo, UpdateRecord


@pytest.fixture
def state():
    s = FederationState(fakeredis.FakeRedis())
    s.create(FederationConfig("fed", LAYOUTS["tiny-llama"], policy=RoundPolicy(min_updates=2)), ["a", "b", "c"])
    s.open_round("fed", 1, 0, now=100.0, timeout=10.0)
    return s


def _record(device: str) -> UpdateRecord:
    return UpdateRecord(device, f"updates/fed/000001/{device}.safetensors", "0" * 64, 10, 10, 1.0, 1.0, 0.0, {}, 0.0)


def test_an_update_is_recorded_once_per_message(state):
    assert state.accept("m1", "fed", 1, _record("a"))[0] == ACCEPTED
    assert state.accept("m1", "fed", 1, _record("a"))[0] == REDELIVERED
    assert state.stats("fed") == {"received": 1, "accepted": 1}
    assert state.stats(None) == {"redelivered": 1}


def test_a_second_message_from_the_same_device_is_refused(state):
    state.accept("m1", "fed", 1, _record("a"))
    assert state.accept("m2", "fed", 1, _record("a"))[0] == RejectReason.ALREADY_SUBMITTED.value


def test_a_rejection_is_counted_and_dead_lettered_once(state):
    assert state.reject("m9", RejectReason.NON_FINITE, "nan", 1.0, fed="fed", round_no=1, device="a")
    assert not state.reject("m9", RejectReason.NON_FINITE, "nan", 1.0, fed="fed", round_no=1, device="a")
    assert state.stats("fed") == {"received": 1, "rejected": 1, "rejected:non_finite": 1}
    assert [e["reason"] for e in state.deadletters()] == ["non_finite"]
    assert state.round_info("fed", 1).rejected == 1


def test_closing_freezes_the_set_of_updates(state):
    for i, d in enumerate("ab"):
        state.accept(f"m{i}", "fed", 1, _record(d))
    decision, _ = state.begin_close("fed", 1, lambda info, n: CLOSING)
    assert decision == CLOSING
    assert state.accept("m3", "fed", 1, _record("c"))[0] == RejectReason.STALE_ROUND.value
    assert list(state.updates("fed", 1)) == ["a", "b"]
    assert state.begin_close("fed", 1, lambda info, n: CLOSING)[0] == "closing"  # a redelivered close resumes


def test_opening_a_round_twice_is_a_no_op(state):
    assert state.open_round("fed", 1, 0, now=200.0, timeout=10.0) is None
    assert state.round_info("fed", 1).opened_at == 100.0
    assert state.round_info("fed", 1).cohort_size == 3


def test_federation_names_are_unique_and_device_ids_checked(state):
    with pytest.raises(StateError, match="exists"):
        state.create(FederationConfig("fed", LAYOUTS["tiny-llama"]), [])
    with pytest.raises(StateError, match="valid id"):
        state.create(FederationConfig("fed2", LAYOUTS["tiny-llama"]), ["../x"])


def test_due_rounds_are_open_rounds_past_their_deadline(state):
    assert state.due_rounds(now=105.0) == []
    assert state.due_rounds(now=110.0) == [("fed", 1)]


INFO = RoundInfo(round=1, status="open", base_version=0, opened_at=0.0, deadline=10.0, cohort_size=4)


@pytest.mark.parametrize("n,now,expected", [
    (0, 5.0, WAIT), (2, 5.0, WAIT), (4, 5.0, CLOSING),  # before the deadline: close only when all reported
    (2, 10.0, CLOSING), (3, 11.0, CLOSING),  # at the deadline: close with quorum
    (1, 10.0, FAILED), (0, 99.0, FAILED),  # at the deadline without quorum: fail
])
def test_decide(n, now, expected):
    assert decide(INFO, n, min_updates=2, now=now) == expected
