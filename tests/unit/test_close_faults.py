"""The close as a leased, resumable state machine: each step interrupted, and hostile object churn."""

from __future__ import annotations

import hashlib

import fakeredis
import numpy as np
import pytest

from fleettune.shared import keys
from fleettune.shared.protocol import versions
from fleettune.shared.protocol.adapter_spec import LAYOUTS, initial_weights
from fleettune.shared.protocol.envelope import Envelope
from fleettune.shared.errors import StateError
from fleettune.shared.federation import EvaluationConfig, FederationConfig, RoundPolicy
from fleettune.shared.pipeline.evaluation import evaluate_version
from fleettune.shared.pipeline.ingest import Ingestor
from fleettune.shared.pipeline.rounds import CLOSED, FAILED, SETTLED, UNREADABLE, RoundCoordinator
from fleettune.shared.settings import Settings
from fleettune.shared.state import FederationState
from fleettune.shared.storage import LocalObjectStore
from fleettune.shared.protocol.updates import encode_update
from tests.reference import random_deltas


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world(tmp_path):
    clock = Clock()
    state, store = FederationState(fakeredis.FakeRedis()), LocalObjectStore(tmp_path)
    config = FederationConfig("f", LAYOUTS["tiny-llama"], policy=RoundPolicy(min_updates=2, max_rounds=3),
                              evaluation=EvaluationConfig(forgetting_threshold=1.2, forgetting_action="lower_lr",
                                                          min_server_lr=0.3))
    coordinator = RoundCoordinator(state, store, Settings(task_time_limit_s=60, visibility_timeout_s=120), clock)
    coordinator.start(config, ["a", "b", "c"])
    return state, store, coordinator, config, clock


def _send(world, device: str, seed: int, round_no: int = 1) -> None:
    state, store, _, config, _ = world
    blob = encode_update(random_deltas(config.spec.tensors, np.random.default_rng(seed), 0.01))
    key = keys.update_object("f", round_no, device)
    store.put(key, blob)
    base = state.rounds.round_info("f", round_no).base_version
    Ingestor(state, store, Settings()).ingest(
        Envelope("f", round_no, device, key, hashlib.sha256(blob).hexdigest(), 5, base).encode())


class _Crash(Exception):
    pass


def _close_dies_before_settling(world, monkeypatch) -> None:
    """Three updates in; task-1's close publishes, then dies before it settles the round."""
    state, _, coordinator, _, _ = world
    for i, device in enumerate("abc"):
        _send(world, device, i)
    monkeypatch.setattr(state.rounds, "settle_round", lambda *a, **k: (_ for _ in ()).throw(_Crash()))
    with pytest.raises(_Crash):
        coordinator.close("f", 1, owner="task-1")
    monkeypatch.undo()


def test_a_close_that_dies_before_settling_is_resumed_by_its_redelivery_without_rewriting(world, monkeypatch):
    state, store, coordinator, _, clock = world
    _close_dies_before_settling(world, monkeypatch)
    assert state.rounds.round_info("f", 1).status == "closing"  # published, but not yet closed
    versions.add_evaluation(store, "f", 1, {"heldout_mean": 9.0})  # what a fast evaluation wrote meanwhile

    assert coordinator.close("f", 1, owner="task-2").decision == "busy"  # the lease is task-1's
    result = coordinator.close("f", 1, owner="task-1")  # its redelivery resumes at once
    assert (result.decision, result.version, result.next_round.round) == (CLOSED, 1, 2)
    assert versions.manifest(store, "f", 1)["evaluation"] == {"heldout_mean": 9.0}  # not rewritten
    assert state.evaluations.evaluations_due(before=clock.now + 1) == [("f", 1)]


def test_an_expired_lease_lets_the_sweep_finish_the_close(world, monkeypatch):
    state, _, coordinator, _, clock = world
    for i, device in enumerate("abc"):
        _send(world, device, i)
    monkeypatch.setattr(coordinator, "_aggregate_and_publish", lambda *a: (_ for _ in ()).throw(_Crash()))
    with pytest.raises(_Crash):
        coordinator.close("f", 1, owner="dead-worker")
    monkeypatch.undo()
    clock.now += 91  # past the task time limit plus the margin
    assert state.rounds.rounds_needing_a_close(clock.now) == [("f", 1)]
    assert coordinator.close("f", 1, owner="sweep").decision == CLOSED


def test_a_round_that_ended_without_its_next_round_gets_it_on_the_next_close(world):
    state, _, coordinator, _, _ = world
    for i, device in enumerate("abc"):
        _send(world, device, i)
    assert coordinator.close("f", 1).decision == CLOSED
    state.r.delete(keys.round_info("f", 2))
    state.r.hset(keys.fed_state("f"), mapping={"round": 1, "version": 1})  # the close died before opening it
    result = coordinator.close("f", 1)
    assert (result.decision, result.next_round.round, result.next_round.base_version) == (SETTLED, 2, 1)


def test_when_accepted_objects_vanish_below_the_quorum_the_round_fails_and_the_next_opens(world):
    state, store, coordinator, _, clock = world
    for i, device in enumerate("abc"):
        _send(world, device, i)
    for device in "ab":  # replaced or deleted after acceptance
        store.put(keys.update_object("f", 1, device), b"not the accepted bytes")
    result = coordinator.close("f", 1)
    assert (result.decision, result.reason) == (FAILED, UNREADABLE)  # one readable update < quorum 2
    assert state.rounds.round_info("f", 1).reason == UNREADABLE
    assert state.rounds.round_info("f", 2).status == "open" and state.rounds.round_info("f", 2).base_version == 0
    assert not store.exists(f"{keys.version_prefix('f', 1)}/{versions.MANIFEST_FILE}")  # nothing published


def test_a_version_is_never_written_twice_with_different_bytes(world):
    _, store, _, config, _ = world
    other = {k: v + 1 for k, v in initial_weights(config.spec, 0).items()}
    with pytest.raises(StateError, match="other bytes"):
        versions.publish(store, "f", 0, other, config.spec, {})


class _Forgetful:
    def evaluate(self, weights, version):
        return {"heldout_mean": 10.0, "general": 15.0, "forgetting_ratio": 1.5}


def test_the_guard_acts_once_per_version_and_stops_at_its_floor(world):
    state, store, coordinator, _, _ = world
    for i, device in enumerate("abc"):
        _send(world, device, i)
    coordinator.close("f", 1)
    evaluate_version(state, store, Settings(), "f", 1, lambda config: _Forgetful())
    evaluate_version(state, store, Settings(), "f", 1, lambda config: _Forgetful())  # redelivered
    assert state.federations.server_lr("f", 1.0) == 0.5
    for i, device in enumerate("abc"):
        _send(world, device, 10 + i, round_no=2)
    coordinator.close("f", 2)
    assert "lowered to 0.3" in evaluate_version(state, store, Settings(), "f", 2, lambda config: _Forgetful())["guard"]  # not 0.25
    for i, device in enumerate("abc"):
        _send(world, device, 20 + i, round_no=3)
    coordinator.close("f", 3)
    assert "held at its floor 0.3" in evaluate_version(state, store, Settings(), "f", 3, lambda config: _Forgetful())["guard"]
    assert state.federations.server_lr("f", 1.0) == 0.3


def test_a_halted_federation_resumes_for_the_rounds_it_has_left(world):
    state, _, coordinator, _, _ = world
    state.federations.stop("f", "halted by the forgetting guard")
    info = coordinator.resume("f")
    assert (info.round, state.federations.status("f")["status"], state.federations.status("f")["last_round"]) == (2, "active", "3")
    with pytest.raises(StateError, match="not halted"):
        coordinator.resume("f")


def test_retention_deletes_a_rounds_updates_and_sets_but_never_a_version(world):
    from fleettune.shared.pipeline import retention

    state, store, coordinator, _, clock = world
    for i, device in enumerate("abc"):
        _send(world, device, i)
    coordinator.close("f", 1)
    assert retention.prune(state, store, clock.now + 10) == (0, 0)  # within the retention
    assert retention.prune(state, store, clock.now + state.retention_s + 1) == (1, 3)
    assert not store.exists(keys.update_object("f", 1, "a"))
    assert not state.r.exists(keys.round_updates("f", 1)) and not state.r.exists(keys.round_cohort("f", 1))
    assert versions.manifest(store, "f", 1)["contributors"] == ["a", "b", "c"]  # published versions stay
    assert state.rounds.round_info("f", 1).status == "closed"  # and so does the round's history
    assert retention.prune(state, store, clock.now + state.retention_s + 1) == (0, 0)


def test_retention_keeps_round_history_for_a_bounded_number_of_rounds(world):
    """Round info and evaluations go `history` rounds later, so Redis stays flat over endless rounds."""
    from fleettune.shared.pipeline import retention

    state, store, coordinator, _, clock = world
    for round_no in (1, 2, 3):
        for i, device in enumerate("abc"):
            _send(world, device, 10 * round_no + i, round_no=round_no)
        version = coordinator.close("f", round_no).version
        state.evaluations.record_evaluation("f", version, {"perplexity": 10.0 + round_no})
    published = [state.rounds.round_info("f", r).version for r in (1, 2, 3)]
    assert retention.prune(state, store, clock.now + state.retention_s + 1, history=2) == (3, 9)
    assert state.rounds.round_info("f", 1) is None  # round 3's pruning took round 1's history
    assert state.evaluations.evaluation("f", published[0]) is None
    assert [state.rounds.round_info("f", r).status for r in (2, 3)] == ["closed", "closed"]
    assert state.evaluations.evaluation("f", published[2]) == {"perplexity": 13.0}
    assert versions.manifest(store, "f", published[0])["contributors"] == ["a", "b", "c"]  # versions stay


def test_a_guard_acting_between_a_close_and_its_redo_does_not_change_the_version(world, monkeypatch):
    state, store, coordinator, _, _ = world
    _close_dies_before_settling(world, monkeypatch)
    state.r.hset(keys.fed_state("f"), "server_lr", "0.25")  # a slow evaluation of v0's guard lands now
    assert coordinator.close("f", 1, owner="task-1").decision == CLOSED  # same bytes: no conflict
    assert versions.manifest(store, "f", 1)["server_lr"] == 1.0  # the rate snapshotted when it began


@pytest.mark.parametrize("write_once", [True, False])
def test_the_close_rehashes_objects_only_where_they_could_change(world, write_once):
    state, store, _, config, clock = world
    coordinator = RoundCoordinator(state, store, Settings(task_time_limit_s=60, visibility_timeout_s=120,
                                                          updates_write_once=write_once), clock)
    for i, device in enumerate("abc"):
        _send(world, device, i)
    other = encode_update(random_deltas(config.spec.tensors, np.random.default_rng(99), 0.01))
    store.put(keys.update_object("f", 1, "a"), other)  # valid bytes, not the accepted ones
    clock.now += 10**6
    manifest = coordinator.close("f", 1).manifest
    if write_once:  # no device can do this: the digest ingest verified is trusted, nothing is hashed
        assert manifest["contributors"] == ["a", "b", "c"] and manifest["excluded"] == {}
    else:
        assert manifest["contributors"] == ["b", "c"] and manifest["excluded"] == {"a": "sha256_mismatch"}
