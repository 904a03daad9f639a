"""Round state on fakeredis: the transactions that make accounting exactly-once."""

import fakeredis
import pytest

from fleettune.shared.protocol.adapter_spec import LAYOUTS
from fleettune.shared.errors import RejectReason, StateError
from fleettune.shared.federation import FederationConfig, RoundPolicy
from fleettune.shared.pipeline.rounds import CLOSING, FAILED, WAIT, decide
from fleettune.shared.state import ACCEPTED, REDELIVERED, FederationState, RoundInfo, UpdateRecord


@pytest.fixture
def state():
    s = FederationState(fakeredis.FakeRedis())
    s.federations.create(FederationConfig("fed", LAYOUTS["tiny-llama"], policy=RoundPolicy(min_updates=2)), ["a", "b", "c"])
    s.rounds.open_round("fed", 1, 0, now=100.0, timeout=10.0)
    return s


def _record(device: str) -> UpdateRecord:
    return UpdateRecord(device, f"updates/fed/000001/{device}.safetensors", "0" * 64, 10, 10, 1.0, 1.0, 0.0, {}, 0.0)


def test_an_update_is_recorded_once_per_message(state):
    assert state.accounting.accept("m1", "fed", 1, _record("a"))[0] == ACCEPTED
    assert state.accounting.accept("m1", "fed", 1, _record("a"))[0] == REDELIVERED
    assert state.federations.stats("fed") == {"received": 1, "accepted": 1}
    assert state.federations.stats(None) == {"redelivered": 1}


def test_a_second_message_from_the_same_device_is_refused(state):
    state.accounting.accept("m1", "fed", 1, _record("a"))
    assert state.accounting.accept("m2", "fed", 1, _record("a"))[0] == RejectReason.ALREADY_SUBMITTED.value


def test_a_rejection_is_counted_and_dead_lettered_once(state):
    assert state.accounting.reject("m9", RejectReason.NON_FINITE, "nan", 1.0, fed="fed", round_no=1, device="a") == (True, False)
    assert state.accounting.reject("m9", RejectReason.NON_FINITE, "nan", 1.0, fed="fed", round_no=1, device="a") == (False, False)
    assert state.federations.stats("fed") == {"received": 1, "rejected": 1, "rejected:non_finite": 1}
    assert [e["reason"] for e in state.accounting.deadletters()] == ["non_finite"]
    assert state.rounds.round_info("fed", 1).rejected == 1


def test_a_refused_selected_device_has_reported_and_the_last_report_makes_the_round_ready(state):
    assert state.accounting.accept("m1", "fed", 1, _record("a"))[1:3] == (1, 3)
    assert state.accounting.reject("m2", RejectReason.NON_FINITE, "nan", 1.0, fed="fed", round_no=1, device="b") == (True, False)
    assert state.accounting.reject("m3", RejectReason.NON_FINITE, "", 1.0, fed="fed", round_no=1, device="x") == (True, False)
    assert state.accounting.reject("m5", RejectReason.TOO_FEW_SAMPLES, "", 1.0, fed="fed", round_no=1, device="c") == (True, False)
    assert state.rounds.reported_count("fed", 1) == 2  # x is not in the cohort; c may still send a corrected envelope
    assert state.accounting.reject("m4", RejectReason.NON_FINITE, "nan", 1.0, fed="fed", round_no=1, device="c") == (True, True)
    decision, _ = state.rounds.begin_close("fed", 1, lambda info, n, reported: decide(info, n, 2, 101.0, reported), "w",
                                    101.0, 10)
    assert decision == FAILED  # everyone reported, one update is below the quorum of 2: nothing more can come


def test_closing_freezes_the_set_of_updates(state):
    for i, d in enumerate("ab"):
        state.accounting.accept(f"m{i}", "fed", 1, _record(d))
    decision, _ = state.rounds.begin_close("fed", 1, lambda info, n, reported: CLOSING, "w", 100.0, 10)
    assert decision == CLOSING
    assert state.accounting.accept("m3", "fed", 1, _record("c"))[0] == RejectReason.STALE_ROUND.value
    assert list(state.rounds.updates("fed", 1)) == ["a", "b"]
    assert state.rounds.begin_close("fed", 1, lambda info, n, reported: CLOSING, "w", 100.0, 10)[0] == "closing"  # a redelivered close resumes


def test_opening_a_round_twice_is_a_no_op(state):
    assert state.rounds.open_round("fed", 1, 0, now=200.0, timeout=10.0) is None
    assert state.rounds.round_info("fed", 1).opened_at == 100.0
    assert state.rounds.round_info("fed", 1).cohort_size == 3


def test_federation_names_are_unique_and_device_ids_checked(state):
    with pytest.raises(StateError, match="exists"):
        state.federations.create(FederationConfig("fed", LAYOUTS["tiny-llama"]), [])
    with pytest.raises(StateError, match="valid id"):
        state.federations.create(FederationConfig("fed2", LAYOUTS["tiny-llama"]), ["../x"])


def test_the_sweep_finds_rounds_past_their_deadline_stuck_closes_and_missing_next_rounds(state):
    assert state.rounds.rounds_needing_a_close(now=105.0) == []
    assert state.rounds.rounds_needing_a_close(now=110.0) == [("fed", 1)]  # open past its deadline
    for digest, device in (("r1", "a"), ("r2", "b"), ("r3", "c")):
        state.accounting.accept(digest, "fed", 1, _record(device))
    assert state.rounds.rounds_needing_a_close(now=105.0) == [("fed", 1)]  # everyone reported: its close was lost
    assert state.rounds.begin_close("fed", 1, lambda *a: CLOSING, "w1", now=105.0, lease_s=10)[0] == CLOSING
    assert state.rounds.rounds_needing_a_close(now=110.0) == []  # its close holds a live lease
    assert state.rounds.rounds_needing_a_close(now=116.0) == [("fed", 1)]  # the lease expired: its worker died
    state.federations.set_status("fed", "active", last_round=5)
    state.rounds.settle_round("fed", 1, 117.0, 1, 10.0, version=1)
    assert state.rounds.round_info("fed", 2).status == "open"
    state.r.hset("ft:fed:fed:state", "round", 1)  # as if the next round had never been opened
    assert state.rounds.rounds_needing_a_close(now=118.0) == [("fed", 1)]


def test_a_close_lease_keeps_a_second_close_out_until_it_expires(state):
    take = lambda owner, now: state.rounds.begin_close("fed", 1, lambda *a: CLOSING, owner, now, lease_s=10)[0]  # noqa: E731
    assert take("w1", 100.0) == CLOSING
    assert take("w2", 101.0) == "busy"
    assert take("w1", 102.0) == CLOSING  # its own redelivery resumes at once
    assert take("w2", 113.0) == CLOSING  # w1's lease ran out: w2 takes the close over
    assert take("w1", 114.0) == "busy"


INFO = RoundInfo(round=1, status="open", base_version=0, opened_at=0.0, deadline=10.0, cohort_size=4)


@pytest.mark.parametrize("n,now,expected", [
    (0, 5.0, WAIT), (2, 5.0, WAIT), (4, 5.0, CLOSING),  # before the deadline: close only when all reported
    (2, 10.0, CLOSING), (3, 11.0, CLOSING),  # at the deadline: close with quorum
    (1, 10.0, FAILED), (0, 99.0, FAILED),  # at the deadline without quorum: fail
])
def test_decide(n, now, expected):
    assert decide(INFO, n, min_updates=2, now=now) == expected


@pytest.mark.parametrize("accepted,reported,now,expected", [
    (2, 3, 5.0, WAIT), (2, 4, 5.0, CLOSING), (1, 4, 5.0, FAILED), (1, 3, 5.0, WAIT),
])
def test_decide_counts_refused_devices_as_reported(accepted, reported, now, expected):
    assert decide(INFO, accepted, min_updates=2, now=now, reported=reported) == expected


def test_a_config_change_waits_for_the_next_round_and_the_round_keeps_its_own(state):
    new, now = state.federations.propose_config("fed", lambda c: c.revised(policy=RoundPolicy(min_updates=3)))
    assert (new.revision, now) == (1, False)
    assert state.federations.config("fed").revision == 0 and state.federations.pending_config("fed").revision == 1
    state.r.hset("ft:fed:fed:round:1", "status", "closed")
    info = state.rounds.open_round("fed", 2, 1, now=120.0, timeout=10.0, config=state.federations.pending_config("fed"))
    assert info.config_rev == 1 and state.federations.config("fed").policy.min_updates == 3
    assert state.federations.pending_config("fed") is None
    assert state.federations.config("fed", 0).policy.min_updates == 2  # round 1's config stays readable
    new, now = state.federations.propose_config("fed", lambda c: c.revised(seed=5))
    assert (new.revision, now) == (2, False)
