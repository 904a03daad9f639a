"""The round close under each strategy: optimizer state across worker restarts, the DP budget, FFA layouts."""

from __future__ import annotations

import dataclasses
import hashlib

import fakeredis
import numpy as np
import pytest

from fleettune.shared import keys
from fleettune.shared.protocol import versions
from fleettune.shared.protocol.adapter_spec import LAYOUTS, initial_weights
from fleettune.shared.protocol.envelope import Envelope
from fleettune.shared.federation import FederationConfig, RoundPolicy
from fleettune.shared.pipeline.ingest import Ingestor
from fleettune.shared.pipeline.rounds import CLOSED, PRIVACY_BUDGET, RoundCoordinator
from fleettune.shared.settings import Settings
from fleettune.shared.state import FederationState
from fleettune.shared.storage import LocalObjectStore
from fleettune.shared.strategies import privacy
from fleettune.shared.strategies.config import AggregationConfig
from fleettune.shared.protocol.updates import encode_update
from tests import reference
from tests.reference import random_deltas

DEVICES = ("a", "b", "c")


def _world(tmp_path, agg: AggregationConfig, server_lr: float = 1.0, max_rounds: int = 5):
    state, store = FederationState(fakeredis.FakeRedis()), LocalObjectStore(tmp_path)
    config = FederationConfig("f", LAYOUTS["tiny-llama"], aggregation=agg,
                              policy=RoundPolicy(min_updates=3, max_rounds=max_rounds, server_lr=server_lr))
    RoundCoordinator(state, store, Settings()).start(config, DEVICES)
    return state, store, config


def _round(state, store, config, round_no: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Every device sends a random update through ingest; returns the deltas sent."""
    sent = []
    for i, device in enumerate(DEVICES):
        delta = random_deltas(config.update_tensors, np.random.default_rng([seed, i]), 0.002)
        blob = encode_update(delta)
        key = keys.update_object("f", round_no, device)
        store.put(key, blob)
        base = state.rounds.round_info("f", round_no).base_version
        result = Ingestor(state, store, Settings()).ingest(
            Envelope("f", round_no, device, key, hashlib.sha256(blob).hexdigest(), 10 + i, base).encode())
        assert result.outcome == "accepted", result
        sent.append(delta)
    return sent


@pytest.mark.parametrize("optimizer", ["adam", "avgm"])
def test_server_optimizer_state_survives_a_worker_restart(tmp_path, optimizer):
    state, store, config = _world(tmp_path, AggregationConfig(optimizer=optimizer), server_lr=0.01)
    x0 = {k: v.numpy().astype(np.float64) for k, v in initial_weights(config.spec, config.seed).items()}
    means = []
    for round_no in (1, 2, 3):
        sent = _round(state, store, config, round_no, seed=round_no)
        means.append(reference.mean_delta(sent, [10, 11, 12], config.policy.max_update_norm))
        # a fresh coordinator each round: nothing is carried in memory from the last close
        result = RoundCoordinator(FederationState(state.r), store, Settings()).close("f", round_no)
        assert result.decision == CLOSED
    assert versions.manifest(store, "f", 3)["server_optimizer_sha256"]
    published = versions.load_weights(store, "f", 3, config.spec, 1 << 30, 1 << 20)
    for k, x in x0.items():
        expected = reference.server_optimizer(optimizer, x, [m[k] for m in means], 0.01)
        np.testing.assert_allclose(published[k].numpy(), expected, atol=1e-6, rtol=1e-5)


def test_ffa_updates_carry_b_only_and_a_stays_at_the_seeded_initialisation(tmp_path):
    state, store, config = _world(tmp_path, AggregationConfig.preset("ffa_lora"))
    assert all(k.endswith("lora_B.weight") for k in config.update_tensors)
    assert 2 * sum(np.prod(s) for s in config.update_tensors.values()) == config.spec.num_parameters
    sent = _round(state, store, config, 1, seed=1)
    assert RoundCoordinator(state, store, Settings()).close("f", 1).decision == CLOSED
    published = versions.load_weights(store, "f", 1, config.spec, 1 << 30, 1 << 20)
    initial = initial_weights(config.spec, config.seed)
    mean = reference.mean_delta(sent, [10, 11, 12], config.policy.max_update_norm)
    for k in config.spec.tensors:
        if k.endswith("lora_A.weight"):
            np.testing.assert_array_equal(published[k].numpy(), initial[k].numpy())
        else:
            np.testing.assert_allclose(published[k].numpy(), initial[k].numpy() + mean[k], atol=1e-7)


def test_an_ffa_federation_rejects_an_update_that_carries_a(tmp_path):
    state, store, config = _world(tmp_path, AggregationConfig.preset("ffa_lora"))
    blob = encode_update(random_deltas(config.spec.tensors, np.random.default_rng(0), 0.001))
    key = keys.update_object("f", 1, "a")
    store.put(key, blob)
    result = Ingestor(state, store, Settings()).ingest(
        Envelope("f", 1, "a", key, hashlib.sha256(blob).hexdigest(), 10, 0).encode())
    assert (result.outcome, result.reason.value) == ("rejected", "unexpected_keys")


def test_dp_rounds_report_epsilon_and_the_federation_completes_before_passing_its_budget(tmp_path):
    z, delta = 2.0, 1e-5
    budget = (privacy.epsilon(z, 1.0, 2, delta) + privacy.epsilon(z, 1.0, 3, delta)) / 2  # room for 2 releases
    agg = AggregationConfig.preset("dp_fedavg", dp_noise_multiplier=z, dp_max_epsilon=budget)
    state, store, config = _world(tmp_path, agg)
    coordinator = RoundCoordinator(state, store, Settings())
    for round_no in (1, 2):
        _round(state, store, config, round_no, seed=round_no)
        assert coordinator.close("f", round_no).decision == CLOSED
        dp = versions.manifest(store, "f", round_no)["dp"]
        assert dp["releases"] == round_no
        assert dp["epsilon"] == pytest.approx(privacy.epsilon(z, 1.0, round_no, delta))
        assert dp["epsilon"] <= budget
    status = state.federations.status("f")
    assert (status["status"], status["reason"]) == ("completed", PRIVACY_BUDGET)
    assert state.rounds.round_info("f", 3) is None  # no round that would pass the budget was opened


def test_a_redone_close_keeps_the_version_its_earlier_attempt_published(tmp_path, monkeypatch):
    agg = AggregationConfig.preset("dp_fedavg", dp_noise_multiplier=1.0)
    state, store, config = _world(tmp_path, agg)
    _round(state, store, config, 1, seed=1)
    first = RoundCoordinator(state, store, Settings())._aggregate_and_publish(config, state.rounds.round_info("f", 1), 1)
    store.put(keys.current_pointer("f"), b'{"version": 0}')  # the first attempt died before moving the pointer
    monkeypatch.setattr("fleettune.shared.pipeline.round_inputs.RoundAggregator", None)  # a redo must not aggregate again
    again = RoundCoordinator(state, store, Settings())._aggregate_and_publish(config, state.rounds.round_info("f", 1), 1)
    assert again == first and versions.current_version(store, "f") == 1
    assert len(state.federations.secret("f")) == 32 and state.federations.secret("f") == state.r.get(keys.fed_secret("f"))


def test_sampling_rate_picks_the_cohort_the_accountant_assumes(tmp_path):
    agg = AggregationConfig.preset("dp_fedavg", dp_noise_multiplier=1.0, sampling_rate=0.5)
    state, store = FederationState(fakeredis.FakeRedis()), LocalObjectStore(tmp_path)
    devices = [f"d{i:03d}" for i in range(200)]
    config = FederationConfig("f", LAYOUTS["tiny-llama"], aggregation=agg, policy=RoundPolicy(min_updates=3))
    RoundCoordinator(state, store, Settings()).start(config, devices)
    cohort = {m.decode() for m in state.r.smembers(keys.round_cohort("f", 1))}
    assert cohort == {d for d in devices if privacy.sampled(state.federations.secret("f"), 1, d, 0.5)}
    assert 70 < len(cohort) < 130


def test_scaffold_publishes_the_server_control_variate_devices_download(tmp_path):
    state, store, config = _world(tmp_path, AggregationConfig.preset("scaffold"))
    assert set(config.update_tensors) == set(config.spec.tensors) | {f"scaffold.{k}" for k in config.spec.tensors}
    sent = _round(state, store, config, 1, seed=3)
    assert RoundCoordinator(state, store, Settings()).close("f", 1).decision == CLOSED
    control = versions.load_control(store, "f", 1, 1 << 30)
    mean = reference.mean_delta(sent, [10, 11, 12], config.policy.max_update_norm)  # one clip over both parts
    for k in config.spec.tensors:  # every enrolled device took part: participation 1, c starts at 0
        np.testing.assert_allclose(control[k].numpy(), mean[f"scaffold.{k}"], atol=1e-6)
    published = versions.load_weights(store, "f", 1, config.spec, 1 << 30, 1 << 20)
    initial = initial_weights(config.spec, config.seed)
    for k in config.spec.tensors:
        np.testing.assert_allclose(published[k].numpy(), initial[k].numpy() + mean[k], atol=1e-6)


def test_clients_per_round_picks_that_many_by_the_secret_and_check_in_turns_the_rest_away(tmp_path):
    from fleettune.shared.control.gateway import Gateway
    from fleettune.shared.control.presign import LocalPresigner
    from fleettune.shared.errors import Refusal
    from fleettune.shared.federation import DeviceProfile

    state, store = FederationState(fakeredis.FakeRedis()), LocalObjectStore(tmp_path)
    devices = [f"d{i:02d}" for i in range(10)]
    config = FederationConfig("f", LAYOUTS["tiny-llama"], policy=RoundPolicy(min_updates=2, clients_per_round=3))
    coordinator = RoundCoordinator(state, store, Settings())
    coordinator.start(config, devices)
    cohort = {m.decode() for m in state.r.smembers(keys.round_cohort("f", 1))}
    assert cohort == set(privacy.pick(state.federations.secret("f"), 1, devices, 3)) and state.rounds.round_info("f", 1).cohort_size == 3
    gateway = Gateway(state, LocalPresigner(b"k" * 32), Settings(), lambda raw, at: None)
    outsider = next(d for d in devices if d not in cohort)
    with pytest.raises(Refusal, match="not_sampled"):
        gateway.check_in("f", DeviceProfile(outsider), "http://api")
    assert gateway.check_in("f", DeviceProfile(sorted(cohort)[0]), "http://api")["round"] == 1
    assert state.rounds.round_info("f", 1).cohort_size == 3  # a picked device checking in is not counted twice
    with pytest.raises(Exception, match="clients_per_round"):
        RoundPolicy(min_updates=4, clients_per_round=3)


def test_epsilon_and_dropped_energy_are_exported_as_gauges(tmp_path):
    from prometheus_client import CollectorRegistry

    from fleettune.shared.metrics import FederationCollector

    agg = AggregationConfig.preset("dp_fedavg", dp_noise_multiplier=2.0)
    state, store, config = _world(tmp_path, agg)
    _round(state, store, config, 1, seed=1)
    RoundCoordinator(state, store, Settings()).close("f", 1)
    registry = CollectorRegistry()
    registry.register(FederationCollector(state, store))
    assert registry.get_sample_value("fleettune_dp_epsilon", {"federation": "f"}) == pytest.approx(
        privacy.epsilon(2.0, 1.0, 1, 1e-5))
    assert registry.get_sample_value("fleettune_truncation_energy_dropped", {"federation": "f"}) is None

    exact_state, exact_store, exact_config = _world(tmp_path / "exact", AggregationConfig.preset("flexlora"))
    _round(exact_state, exact_store, exact_config, 1, seed=1)
    RoundCoordinator(exact_state, exact_store, Settings()).close("f", 1)
    registry = CollectorRegistry()
    registry.register(FederationCollector(exact_state, exact_store))
    dropped = registry.get_sample_value("fleettune_truncation_energy_dropped", {"federation": "f"})
    assert dropped == versions.manifest(exact_store, "f", 1)["aggregation"]["truncation_energy_dropped"]
    assert 0 < dropped < 1  # three rank-8 updates re-factorised to rank 8 drop something


def test_the_dp_ledger_survives_switching_dp_off_and_on_with_another_noise(tmp_path):
    state, store, config = _world(tmp_path, AggregationConfig.preset("dp_fedavg", dp_noise_multiplier=2.0))
    coordinator = RoundCoordinator(state, store, Settings())
    plan = {1: AggregationConfig(), 2: AggregationConfig.preset("dp_fedavg", dp_noise_multiplier=1.0)}
    for round_no in (1, 2, 3):
        _round(state, store, config, round_no, seed=round_no)
        if round_no in plan:  # applies from the next round
            state.federations.propose_config("f", lambda c, agg=plan[round_no]: c.revised(aggregation=agg))
        assert coordinator.close("f", round_no).decision == CLOSED
    off = versions.manifest(store, "f", 2)["dp"]
    assert off["ledger"] == [[2.0, 1.0, 1]] and off["epsilon"] == pytest.approx(privacy.epsilon(2.0, 1.0, 1, 1e-5))
    on = versions.manifest(store, "f", 3)["dp"]
    assert on["ledger"] == [[2.0, 1.0, 1], [1.0, 1.0, 1]] and on["releases"] == 2
    assert on["epsilon"] == pytest.approx(privacy.ledger_epsilon(((2.0, 1.0, 1), (1.0, 1.0, 1)), 1e-5))
    assert on["epsilon"] > privacy.epsilon(1.0, 1.0, 1, 1e-5)  # the first release still counts


def test_a_robust_rule_past_its_memory_bound_closes_with_the_first_updates_and_names_the_rest(tmp_path):
    state, store, config = _world(tmp_path, AggregationConfig.preset("median", max_robust_updates=3))
    _round(state, store, config, 1, seed=1)
    for device in ("d", "e"):  # two more accepted updates than the median may hold
        state.federations.enroll("f", [device])
        assert state.rounds.join_cohort("f", 1, device)
        delta = random_deltas(config.update_tensors, np.random.default_rng(len(device)), 0.002)
        blob = encode_update(delta)
        key = keys.update_object("f", 1, device)
        store.put(key, blob)
        assert Ingestor(state, store, Settings()).ingest(
            Envelope("f", 1, device, key, hashlib.sha256(blob).hexdigest(), 10, 0).encode()).outcome == "accepted"
    result = RoundCoordinator(state, store, Settings()).close("f", 1)
    assert result.decision == CLOSED
    manifest = versions.manifest(store, "f", 1)
    assert manifest["contributors"] == ["a", "b", "c"]
    assert manifest["excluded"] == {"d": "over_max_robust_updates", "e": "over_max_robust_updates"}


def test_a_new_server_lr_replaces_the_rate_the_forgetting_guard_lowered(tmp_path):
    state, store, config = _world(tmp_path, AggregationConfig())
    state.r.hset(keys.fed_state("f"), "server_lr", "0.5")  # what the guard left for plain FedAvg
    _round(state, store, config, 1, seed=1)
    state.federations.propose_config("f", lambda c: c.revised(aggregation=AggregationConfig.preset("fedadam"),
                                                 policy=dataclasses.replace(c.policy, server_lr=0.01)))
    RoundCoordinator(state, store, Settings()).close("f", 1)
    assert state.federations.server_lr("f", 0.01) == 0.01  # FedAdam does not inherit FedAvg's 0.5
