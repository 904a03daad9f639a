"""The ingest and close logic on fakeredis and a local directory store (no services)."""

import hashlib

import fakeredis
import numpy as np
import pytest

from fleettune.shared import keys
from fleettune.shared.protocol import versions
from fleettune.shared.protocol.adapter_spec import LAYOUTS
from fleettune.shared.protocol.envelope import Envelope
from fleettune.shared.errors import ObjectNotFound, RejectReason, Rejected
from fleettune.shared.federation import FederationConfig, RoundPolicy
from fleettune.shared.pipeline.ingest import Ingestor
from fleettune.shared.pipeline.rounds import RoundCoordinator
from fleettune.shared.settings import Settings
from fleettune.shared.state import FederationState
from fleettune.shared.storage import LocalObjectStore
from fleettune.shared.protocol.updates import encode_update
from tests.reference import next_global, random_deltas


@pytest.fixture
def world(tmp_path):
    state = FederationState(fakeredis.FakeRedis())
    store = LocalObjectStore(tmp_path / "objects")
    settings = Settings()
    config = FederationConfig("fed", LAYOUTS["tiny-llama"],
                              policy=RoundPolicy(min_updates=2, max_num_samples=50, max_rounds=2))
    RoundCoordinator(state, store, settings).start(config, ["a", "b", "c"])
    return state, store, settings, config


def _send(world, device, arrays, num_samples=10, round_no=1):
    state, store, settings, config = world
    blob = encode_update(arrays)
    key = keys.update_object("fed", round_no, device)
    store.put(key, blob)
    env = Envelope("fed", round_no, device, key, hashlib.sha256(blob).hexdigest(), num_samples, round_no - 1)
    return Ingestor(state, store, settings).ingest(env.encode())


def test_claims_above_the_cap_are_capped_and_the_round_closes_when_everyone_reported(world):
    state, store, settings, config = world
    rng = np.random.default_rng(0)
    deltas = [random_deltas(config.spec.tensors, rng, 0.02) for _ in range(3)]
    results = [_send(world, d, x, n) for d, x, n in zip("abc", deltas, [10, 10_000, 30])]
    assert [r.outcome for r in results] == ["accepted"] * 3
    assert [r.round_ready for r in results] == [False, False, True]
    assert state.rounds.updates("fed", 1)["b"].num_samples == 50

    result = RoundCoordinator(state, store, settings).close("fed", 1)

    assert result.decision == "closed" and result.version == 1 and result.next_round.round == 2
    from safetensors.numpy import load
    got = load(store.get(f"{keys.version_prefix('fed', 1)}/{versions.ADAPTER_FILE}"))
    prev = load(store.get(f"{keys.version_prefix('fed', 0)}/{versions.ADAPTER_FILE}"))
    ref = next_global(prev, deltas, [10, 10_000, 30], 1.0, 50, 1.0)
    assert max(float(np.abs(got[k] - ref[k]).max()) for k in ref) <= 1e-6


def test_a_redone_close_writes_identical_bytes(world):
    state, store, settings, config = world
    rng = np.random.default_rng(1)
    for d in "ab":
        _send(world, d, random_deltas(config.spec.tensors, rng, 0.01))
    coordinator = RoundCoordinator(state, store, settings, clock=lambda: 10**12)  # past the deadline
    first = coordinator.close("fed", 1).manifest
    # a worker died after publishing but before marking the round closed: the redelivered close redoes it
    state.r.hset(keys.round_info("fed", 1), "status", "closing")
    second = coordinator._aggregate_and_publish(config, state.rounds.round_info("fed", 1), 1)
    assert first["adapter_sha256"] == second["adapter_sha256"]


def test_an_unexpected_error_is_dead_lettered_not_lost(world, monkeypatch):
    state, store, settings, config = world
    monkeypatch.setattr("fleettune.shared.pipeline.ingest.update_norm", lambda t: 1 / 0)
    result = _send(world, "a", random_deltas(config.spec.tensors, np.random.default_rng(2), 0.01))
    assert result.outcome == "rejected" and result.reason is RejectReason.INTERNAL_ERROR
    assert state.federations.stats("fed")["rejected:internal_error"] == 1


def test_local_store_bounds_reads_and_refuses_escaping_keys(tmp_path):
    store = LocalObjectStore(tmp_path)
    store.put("a/b", b"x" * 10)
    assert store.get("a/b", max_bytes=10) == b"x" * 10
    with pytest.raises(Rejected) as err:
        store.get("a/b", max_bytes=9)
    assert err.value.reason is RejectReason.OBJECT_TOO_LARGE
    with pytest.raises(ObjectNotFound):
        store.get("a/c")
    with pytest.raises(ValueError, match="escapes"):
        store.put("../outside", b"")
