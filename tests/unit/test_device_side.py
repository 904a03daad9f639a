"""Memory budget, device filter, corpora partitions and the forgetting guard (no services)."""

import hashlib

import fakeredis
import numpy as np
import pytest

from fleettune.shared import corpora, keys
from fleettune.shared.protocol.adapter_spec import LAYOUTS, AdapterConfig, build_spec
from fleettune.shared.device import memory
from fleettune.shared.protocol.envelope import Envelope
from fleettune.shared.errors import RejectReason
from fleettune.shared.federation import DeviceFilter, DeviceProfile, EvaluationConfig, FederationConfig, RoundPolicy
from fleettune.shared.pipeline.evaluation import evaluate_version
from fleettune.shared.pipeline.ingest import Ingestor
from fleettune.shared.pipeline.rounds import RoundCoordinator
from fleettune.shared.settings import Settings
from fleettune.shared.state import FederationState
from fleettune.shared.storage import LocalObjectStore
from fleettune.shared.protocol.updates import encode_update
from tests.reference import random_deltas


def test_memory_budget_matches_the_spec_worked_example():
    """1B parameters at 4-bit with rank-8 adapters: about 1.7 GB in total."""
    adapters = build_spec(LAYOUTS["llama-1b"], AdapterConfig(rank=8)).num_parameters
    est = memory.estimate(1e9, adapters, LAYOUTS["llama-1b"], bits=4)
    assert est.total / 1e9 == pytest.approx(1.7, abs=0.05)
    assert est.base == pytest.approx(0.5e9 + 1e9 / 64 * 4)  # NF4 weights + one fp32 absmax per 64
    assert est.optimizer == adapters * 8
    assert memory.fits(est, 2048) and not memory.fits(est, 1024)


def test_memory_budget_grows_with_bits_batch_and_sequence():
    dims = LAYOUTS["llama-1b"]
    small = memory.estimate(1e9, 1e6, dims, bits=4, batch=1, seq=256)
    assert memory.estimate(1e9, 1e6, dims, bits=16).base == 4 * small.base - 4 * 1e9 / 64 * 4
    assert memory.estimate(1e9, 1e6, dims, batch=2).activations == 2 * small.activations
    assert memory.estimate(1e9, 1e6, dims, seq=512).activations > 2 * small.activations  # attention is quadratic
    with pytest.raises(ValueError):
        memory.estimate(1e9, 1e6, dims, bits=3)


def test_devices_below_the_filter_are_not_enrolled_and_their_updates_are_refused(tmp_path):
    state, store = FederationState(fakeredis.FakeRedis()), LocalObjectStore(tmp_path)
    config = FederationConfig("f", LAYOUTS["tiny-llama"], device_filter=DeviceFilter(min_ram_mb=2048, min_storage_mb=500),
                              policy=RoundPolicy(min_updates=1))
    devices = [DeviceProfile("big", 8192, 4000), DeviceProfile("low-ram", 1024, 4000),
               DeviceProfile("low-disk", 8192, 100), "undeclared"]
    _, refused = RoundCoordinator(state, store, Settings()).start(config, devices)
    assert refused == ["low-disk", "low-ram", "undeclared"]
    assert state.federations.enrolled("f") == ["big"]
    assert state.federations.enroll("f", [DeviceProfile("later", 512, 4000)]) == ["later"]

    blob = encode_update(random_deltas(config.spec.tensors, np.random.default_rng(0), 0.01))
    key = keys.update_object("f", 1, "low-ram")
    store.put(key, blob)
    env = Envelope("f", 1, "low-ram", key, hashlib.sha256(blob).hexdigest(), 10, 0)
    assert Ingestor(state, store, Settings()).ingest(env.encode()).reason is RejectReason.NOT_SELECTED


def test_partitions_are_non_iid_disjoint_and_never_touch_held_out_text():
    parts = corpora.partition({"literature": 2, "legal": 2, "code": 2}, 5000, seed=3)
    assert [p.domain for p in parts] == ["literature"] * 2 + ["legal"] * 2 + ["code"] * 2
    assert len({p.client for p in parts}) == 6 and all(len(p.text) > 1000 for p in parts)
    heldout = corpora.heldout_text("legal", 20_000)
    assert all(heldout[:200] not in p.text for p in parts)
    assert corpora.heldout_text("code", 3000) == corpora.heldout_text("code", 3000)  # deterministic


def test_held_out_text_splits_into_disjoint_validation_and_test_halves():
    docs = [d for d in corpora.documents("legal") if d.heldout]
    parts = {d.heldout_part for d in docs}
    assert parts == {"validation", "test"}
    val, test = corpora.heldout_text("legal", 40_000, "validation"), corpora.heldout_text("legal", 40_000, "test")
    assert min(len(val), len(test)) >= 40_000 and val[:300] not in test and test[:300] not in val
    assert val[:300] in corpora.heldout_text("legal", 10**7) and test[:300] in corpora.heldout_text("legal", 10**7)


def test_literature_devices_hold_a_whole_play_once_no_character_is_large_enough():
    parts = corpora.partition({"literature": 3}, 100_000, seed=0)
    assert all(len(p.text) > 50_000 for p in parts) and len({p.client for p in parts}) == 3
    assert all(":" not in p.client for p in parts)  # named by the play, not a character
    roles = corpora.partition({"literature": 3}, 5000, seed=0)
    assert all(len(p.text) <= 5000 for p in roles)
    with pytest.raises(ValueError, match="too little training text"):
        corpora.partition({"legal": 10}, 10**7)


@pytest.mark.skipif(not corpora.GCIDE.exists(), reason="apt-get install dict-gcide (scripts/test.sh does)")
def test_the_medical_domain_comes_from_labelled_dictionary_entries():
    docs = corpora.documents("medical")
    assert len(docs) > 3000
    assert all(any(label in d.text for label in corpora.MEDICAL_LABELS) for d in docs[:200])
    assert not any("[1913 Webster" in d.text or "\\" in d.text for d in docs[:200])
    parts = corpora.partition({"medical": 2}, 8000, seed=1)
    assert [p.domain for p in parts] == ["medical", "medical"] and all(len(p.text) == 8000 for p in parts)


class _Evaluator:
    """Stands in for the model: the guard logic is what is tested here, real perplexity elsewhere."""

    def __init__(self, ratio: float):
        self.ratio = ratio

    def evaluate(self, weights, version):
        return {"heldout_mean": 10.0, "general": 10.0 * self.ratio, "forgetting_ratio": self.ratio}


def _closed_round(tmp_path, action: str):
    state, store = FederationState(fakeredis.FakeRedis()), LocalObjectStore(tmp_path)
    config = FederationConfig("f", LAYOUTS["tiny-llama"], policy=RoundPolicy(min_updates=1, server_lr=1.0),
                              evaluation=EvaluationConfig(forgetting_threshold=1.2, forgetting_action=action))
    coordinator = RoundCoordinator(state, store, Settings())
    coordinator.start(config, ["a"])
    blob = encode_update(random_deltas(config.spec.tensors, np.random.default_rng(0), 0.01))
    store.put(keys.update_object("f", 1, "a"), blob)
    Ingestor(state, store, Settings()).ingest(
        Envelope("f", 1, "a", keys.update_object("f", 1, "a"), hashlib.sha256(blob).hexdigest(), 5, 0).encode())
    assert coordinator.close("f", 1).version == 1
    return state, store, coordinator


def test_forgetting_within_bounds_changes_nothing(tmp_path):
    state, store, coordinator = _closed_round(tmp_path, "halt")
    result = evaluate_version(state, store, Settings(), "f", 1, lambda config: _Evaluator(1.1))
    assert "guard" not in result and state.federations.status("f")["status"] == "active"
    assert state.evaluations.evaluation("f", 1) == result


def test_forgetting_past_the_threshold_lowers_the_server_learning_rate(tmp_path):
    state, store, coordinator = _closed_round(tmp_path, "lower_lr")
    result = evaluate_version(state, store, Settings(), "f", 1, lambda config: _Evaluator(1.5))
    assert state.federations.server_lr("f", 1.0) == 0.5
    assert "server_lr lowered to 0.5" in state.rounds.round_info("f", 2).guard == result["guard"]
    from fleettune.shared.protocol import versions
    assert versions.manifest(store, "f", 1)["evaluation"]["forgetting_ratio"] == 1.5


def test_forgetting_past_the_threshold_can_halt_the_federation(tmp_path):
    state, store, coordinator = _closed_round(tmp_path, "halt")
    evaluate_version(state, store, Settings(), "f", 1, lambda config: _Evaluator(1.5))
    assert state.federations.status("f")["status"] == "halted"
    info = state.rounds.round_info("f", 2)
    assert info.status == "failed" and info.reason == "halted" and "halted" in info.guard
