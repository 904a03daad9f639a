"""Async (FedBuff) rounds on fakeredis and a local store: staleness weights, buffers, refusals."""

import dataclasses
import hashlib

import fakeredis
import numpy as np
import pytest
from safetensors.numpy import load

from fleettune.shared import keys
from fleettune.shared.errors import BufferClosing, ConfigError, RejectReason
from fleettune.shared.federation import FederationConfig, RoundPolicy
from fleettune.shared.pipeline.ingest import Ingestor
from fleettune.shared.pipeline.rounds import CLOSING, WAIT, RoundCoordinator, decide
from fleettune.shared.protocol import versions
from fleettune.shared.protocol.adapter_spec import LAYOUTS
from fleettune.shared.protocol.envelope import Envelope
from fleettune.shared.protocol.updates import encode_update
from fleettune.shared.settings import Settings
from fleettune.shared.state import FederationState, RoundInfo
from fleettune.shared.storage import LocalObjectStore
from fleettune.shared.strategies.config import AggregationConfig
from tests.reference import next_global, random_deltas

DEVICES = ["a", "b", "c", "d", "e"]


@pytest.fixture
def world(tmp_path):
    state = FederationState(fakeredis.FakeRedis())
    store = LocalObjectStore(tmp_path / "objects")
    settings = Settings()
    policy = RoundPolicy(mode="async", buffer_size=2, min_updates=1, max_staleness=2, max_rounds=20,
                         max_update_norm=100.0)
    config = FederationConfig("fed", LAYOUTS["tiny-llama"], policy=policy)
    coordinator = RoundCoordinator(state, store, settings)
    coordinator.start(config, DEVICES)
    return state, store, settings, config, coordinator


def _check_in(state, device) -> tuple[int, int]:
    """What the gateway's check-in does for the round machine: (round, the version it serves)."""
    round_no = state.federations.current_round("fed")
    assert state.rounds.join_cohort("fed", round_no, device)
    return round_no, state.rounds.round_info("fed", round_no).base_version


def _send(world, device, arrays, round_no, base, num_samples=10):
    state, store, settings, _, _ = world
    blob = encode_update(arrays)
    key = keys.update_object("fed", round_no, device)
    if not store.exists(key):
        store.put(key, blob)
    env = Envelope("fed", round_no, device, key, hashlib.sha256(store.get(key)).hexdigest(), num_samples, base)
    return Ingestor(state, store, settings).ingest(env.encode())


def _adapter(store, version):
    return load(store.get(f"{keys.version_prefix('fed', version)}/{versions.ADAPTER_FILE}"))


def test_a_stale_update_joins_the_open_buffer_weighted_by_its_staleness(world):
    state, store, settings, config, coordinator = world
    rng = np.random.default_rng(0)
    delta = {d: random_deltas(config.spec.tensors, rng, 0.01) for d in DEVICES}
    checked = {d: _check_in(state, d) for d in "abc"}  # all three train from v0 in buffer 1

    results = [_send(world, d, delta[d], *checked[d]) for d in "ab"]
    assert [r.round_ready for r in results] == [False, True] and {r.staleness for r in results} == {0}
    first = coordinator.close("fed", 1)
    assert first.decision == "closed" and first.version == 1 and first.next_round.base_version == 1

    late = _send(world, "c", delta["c"], *checked["c"])  # trained from v0; v1 is out: staleness 1
    assert late.outcome == "accepted" and late.round == 2 and late.staleness == 1
    assert state.rounds.updates("fed", 2)["c"].staleness_weight == pytest.approx(2 ** -0.5)
    fresh = _send(world, "d", delta["d"], *_check_in(state, "d"))
    assert fresh.round_ready and coordinator.close("fed", 2).version == 2

    weight = 2 ** -config.policy.staleness_exponent
    scaled_c = {k: weight * v for k, v in delta["c"].items()}
    want = next_global(_adapter(store, 1), [scaled_c, delta["d"]], [10, 10], None, 50, config.policy.server_lr)
    got = _adapter(store, 2)
    assert max(float(np.abs(got[k] - want[k]).max()) for k in want) <= 1e-6


def test_a_slow_device_weighs_the_versions_it_missed(world):
    """FedAU's participation weight: a device whose update joins every buffer weighs 1; one whose
    first update arrives two versions in weighs the 3 versions since v0 (the cap: max_staleness + 1)."""
    state, store, settings, config, coordinator = world
    rng = np.random.default_rng(3)
    slow = _check_in(state, "c")  # trains from v0 and sends only after two publishes
    for round_no in (1, 2):
        for d in "ab":
            assert _send(world, d, random_deltas(config.spec.tensors, rng, 0.01), *_check_in(state, d)).outcome \
                == "accepted"
        coordinator.close("fed", round_no)
    fast_delta, slow_delta = (random_deltas(config.spec.tensors, rng, 0.01) for _ in range(2))
    assert _send(world, "a", fast_delta, *_check_in(state, "a")).outcome == "accepted"
    assert _send(world, "c", slow_delta, *slow).staleness == 2
    records = state.rounds.updates("fed", 3)
    assert (records["a"].participation, records["c"].participation) == (1, 3)
    assert coordinator.close("fed", 3).version == 3

    s = 3 ** -config.policy.staleness_exponent  # staleness 2
    prev, got = _adapter(store, 2), _adapter(store, 3)
    for k in prev:  # weights: 10 samples x 1 and 10 samples x 3; the slow update also scaled by s
        want = prev[k].astype(np.float64) + config.policy.server_lr * (
            10 * fast_delta[k].astype(np.float64) + 30 * s * slow_delta[k].astype(np.float64)) / 40
        assert float(np.abs(got[k] - want).max()) <= 1e-6

    plain = RoundPolicy(mode="async", participation_weighting=False)
    assert plain.participation_weight(7) == 1 and RoundPolicy(mode="async", max_staleness=4).participation_weight(9) == 5


def test_async_refusals_are_named(world):
    state, store, settings, config, coordinator = world
    rng = np.random.default_rng(1)
    checked = {d: _check_in(state, d) for d in "abcd"}
    deltas = {d: random_deltas(config.spec.tensors, rng, 0.01) for d in DEVICES}

    future = _send(world, "a", deltas["a"], 1, 5)
    assert future.reason is RejectReason.FUTURE_BASE_VERSION
    assert _send(world, "zz", deltas["e"], 1, 0).reason is RejectReason.NOT_SELECTED  # not enrolled
    for d in "ab":
        _send(world, d, deltas[d], *checked[d])
    coordinator.close("fed", 1)
    # a second update from "a" for v0, now in buffer 2 (a new message: another sample count)
    assert _send(world, "a", deltas["a"], 1, 0, num_samples=11).reason is RejectReason.DUPLICATE_BASE_VERSION
    for round_no in (2, 3):  # two more versions: "c" and "d", still on v0, fall behind
        for d in ("a", "b"):
            assert _send(world, d, deltas[d], *_check_in(state, d)).outcome == "accepted"
        coordinator.close("fed", round_no)
    stale = _send(world, "c", deltas["c"], *checked["c"])
    assert stale.reason is RejectReason.TOO_STALE and "3 versions old" in stale.detail
    assert stale.round == 1  # dead-lettered under the round it checked in to
    assert state.accounting.deadletters(1)[0]["reason"] == "too_stale"


def test_an_update_meeting_its_buffer_closing_is_retried_not_rejected(world):
    state, store, settings, config, coordinator = world
    round_no, base = _check_in(state, "a")
    state.r.hset(keys.round_info("fed", 1), "status", "closing")
    with pytest.raises(BufferClosing):
        _send(world, "a", random_deltas(config.spec.tensors, np.random.default_rng(2), 0.01), round_no, base)
    assert state.accounting.deadletters(5) == []


def _buffer(deadline=100.0, size=4) -> RoundInfo:
    return RoundInfo(1, "open", 0, 0.0, deadline, cohort_size=3, mode="async", buffer_size=size)


@pytest.mark.parametrize("n, now, want", [
    (4, 10.0, CLOSING),   # full
    (3, 10.0, WAIT),      # neither full nor old; everyone in the cohort reported does not close a buffer
    (1, 200.0, CLOSING),  # old, with the quorum (min_updates 1)
    (0, 200.0, WAIT),     # old without it: waits, never fails (a failed buffer would drop what it holds)
])
def test_a_buffer_publishes_when_full_or_old_and_never_fails(n, now, want):
    assert decide(_buffer(), n, 1, now, reported=3) == want


def test_async_config_checks():
    with pytest.raises(ConfigError, match="buffer_size"):
        RoundPolicy(mode="async", buffer_size=2, min_updates=3)
    RoundPolicy(mode="sync", min_updates=10)  # buffer_size only binds async rounds
    with pytest.raises(ConfigError, match="clients_per_round"):
        RoundPolicy(mode="async", clients_per_round=4)
    with pytest.raises(ConfigError, match="sampling_rate"):
        FederationConfig("f", LAYOUTS["tiny-llama"], policy=RoundPolicy(mode="async"),
                         aggregation=dataclasses.replace(AggregationConfig(), sampling_rate=0.5))
    policy = RoundPolicy(mode="async", staleness_exponent=1.0)
    assert [policy.staleness_weight(t) for t in (0, 1, 3)] == [1.0, 0.5, 0.25]


def test_each_publish_of_a_dp_buffer_is_one_release(tmp_path):
    state, store, settings = FederationState(fakeredis.FakeRedis()), LocalObjectStore(tmp_path / "o"), Settings()
    config = FederationConfig("fed", LAYOUTS["tiny-llama"], aggregation=AggregationConfig.preset("dp_fedavg"),
                              policy=RoundPolicy(mode="async", buffer_size=2, min_updates=1, max_rounds=5))
    coordinator = RoundCoordinator(state, store, settings)
    coordinator.start(config, DEVICES)
    world = (state, store, settings, config, coordinator)
    rng = np.random.default_rng(3)
    held = _check_in(state, "c")  # from v0, sent after v1: stale, and clipped like any other
    for round_no, devices in ((1, "ab"), (2, "d")):
        for d in devices:
            assert _send(world, d, random_deltas(config.spec.tensors, rng, 0.01), *_check_in(state, d)).outcome == "accepted"
        if round_no == 2:
            assert _send(world, "c", random_deltas(config.spec.tensors, rng, 0.01), *held).staleness == 1
        assert coordinator.close("fed", round_no).decision == "closed"
    first, second = (versions.manifest(store, "fed", v)["dp"] for v in (1, 2))
    assert (first["releases"], second["releases"]) == (1, 2) and second["epsilon"] > first["epsilon"]


def test_staleness_is_a_histogram_and_buffer_fill_a_gauge(world):
    from prometheus_client import CollectorRegistry

    from fleettune.shared.metrics import FederationCollector, Metrics
    from fleettune.shared.pipeline.ingest import IngestResult

    state, store, settings, config, coordinator = world
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for tau in (0, 2, 2):
        metrics.observe_ingest(IngestResult("accepted", "fed", 1, "a", norm=1.0, clip_scale=1.0, staleness=tau))
    assert registry.get_sample_value("fleettune_update_staleness_count", {"federation": "fed"}) == 3
    assert registry.get_sample_value("fleettune_update_staleness_bucket", {"federation": "fed", "le": "1.0"}) == 1
    _send(world, "a", random_deltas(config.spec.tensors, np.random.default_rng(4), 0.01), *_check_in(state, "a"))
    registry.register(FederationCollector(state, store))
    assert registry.get_sample_value("fleettune_buffer_fill", {"federation": "fed"}) == 0.5  # 1 of buffer_size 2


def test_a_lower_rank_tier_sends_its_own_layout_into_a_later_buffer(tmp_path):
    from fleettune.shared.federation import DeviceProfile
    from fleettune.shared.protocol.adapter_spec import AdapterConfig

    state, store, settings = FederationState(fakeredis.FakeRedis()), LocalObjectStore(tmp_path / "o"), Settings()
    config = FederationConfig("fed", LAYOUTS["tiny-llama"], AdapterConfig(rank=8, tier_ranks=(("phone", 4),)),
                              policy=RoundPolicy(mode="async", buffer_size=2, min_updates=1, max_rounds=5))
    coordinator = RoundCoordinator(state, store, settings)
    coordinator.start(config, ["a", "b", "c", DeviceProfile("p", tier="phone")])
    world = (state, store, settings, config, coordinator)
    rng = np.random.default_rng(5)
    held = _check_in(state, "p")
    for d in "ab":
        _send(world, d, random_deltas(config.spec.tensors, rng, 0.01), *_check_in(state, d))
    assert coordinator.close("fed", 1).decision == "closed"
    phone = _send(world, "p", random_deltas(config.update_tensors_for(4), rng, 0.01), *held)
    assert (phone.outcome, phone.round, phone.staleness) == ("accepted", 2, 1)
    assert state.rounds.updates("fed", 2)["p"].rank == 4
    _send(world, "c", random_deltas(config.spec.tensors, rng, 0.01), *_check_in(state, "c"))
    closed = coordinator.close("fed", 2)
    assert closed.decision == "closed" and closed.manifest["contributors"] == ["c", "p"]
