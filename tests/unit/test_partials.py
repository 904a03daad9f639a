"""Partial sums: folded as updates arrive, reduced at the close, equal to reading every update."""

from __future__ import annotations

import hashlib

import fakeredis
import numpy as np
import pytest
import torch

from fleettune.shared import keys
from fleettune.shared.protocol import versions
from fleettune.shared.protocol.adapter_spec import LAYOUTS
from fleettune.shared.protocol.envelope import Envelope
from fleettune.shared.federation import FederationConfig, RoundPolicy
from fleettune.shared.pipeline.folding import PartialFolder
from fleettune.shared.pipeline.ingest import Ingestor
from fleettune.shared.pipeline.rounds import CLOSED, RoundCoordinator
from fleettune.shared.settings import Settings
from fleettune.shared.state import FederationState
from fleettune.shared.state.partials import ALREADY, COMMITTED, REFUSED
from fleettune.shared.storage import LocalObjectStore
from fleettune.shared.strategies.config import AggregationConfig
from fleettune.shared.strategies.partial import PartialSum, weight, weight_cap
from fleettune.shared.protocol.updates import encode_update
from tests.reference import random_deltas

SHAPES = {"a": (3, 4), "b": (5,)}
NOW = [1000.0]


@pytest.mark.parametrize("uniform", [False, True])
def test_a_partial_sum_through_its_bytes_with_early_updates_reweighed_equals_the_dense_mean(uniform):
    rng = np.random.default_rng(3)
    updates = [{k: torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for k, s in SHAPES.items()}
               for _ in range(30)]
    claims = [int(n) for n in rng.integers(5, 400, 30)]
    claims[2] = 10**5  # early and far above the cap: its folded term is almost all subtracted again
    clips = [float(c) for c in rng.uniform(0.2, 1.0, 30)]
    cap = weight_cap(float(np.median(claims[:8])), 2.0, uniform)
    parts = [PartialSum(SHAPES) for _ in range(3)]
    for i, (u, n, c) in enumerate(zip(updates, claims, clips)):
        early = i < 7  # accepted before the cap was known: folded at its claim
        parts[i % 3].add(u, weight(n, None if early else cap, uniform), c, early=early and not uniform)
    back = [PartialSum.decode(p.encode(), SHAPES, p.metadata(), 1 << 20) for p in parts]
    total = {k: torch.zeros(s, dtype=torch.float64) for k, s in SHAPES.items()}
    total_weight = 0.0
    for p in back:
        p.add_to(total)
        total_weight += p.weight
    for i in range(7):  # the close's correction of the early ones
        dw = weight(claims[i], cap, uniform) - weight(claims[i], None, uniform)
        for k in total:
            total[k] += dw * clips[i] * updates[i][k].double()
        total_weight += dw
    weights = [1.0 if uniform else min(n, cap) for n in claims]
    assert total_weight == pytest.approx(sum(weights), rel=1e-12) and sum(p.count for p in back) == 30
    for k in SHAPES:
        dense = sum(w * c * u[k].double() for w, c, u in zip(weights, clips, updates)) / sum(weights)
        np.testing.assert_allclose((total[k] / total_weight).numpy(), dense.numpy(), atol=1e-7)
    with pytest.raises(ValueError, match="float32 sum"):  # a partial is always the server's own layout
        PartialSum.decode(encode_update({"sum." + k: np.zeros(s, np.float64) for k, s in SHAPES.items()}), SHAPES,
                          {"count": 1, "weight": 1.0, "early": False}, 1 << 20)


def _world(tmp_path, name: str, agg: AggregationConfig, devices: list[str]):
    state = FederationState(fakeredis.FakeRedis())
    store = LocalObjectStore(tmp_path / name)
    config = FederationConfig("f", LAYOUTS["tiny-llama"], aggregation=agg,
                              policy=RoundPolicy(min_updates=2, max_rounds=3, server_lr=0.9, max_update_norm=0.05))
    coordinator = RoundCoordinator(state, store, Settings(), clock=lambda: NOW[0])
    coordinator.start(config, devices + ["never-reports"])  # the round stays open until its deadline
    return state, store, config, coordinator


def _send(state, store, config, ingestor, round_no, device, delta, n, times=1):
    blob = encode_update(delta)
    key = keys.update_object("f", round_no, device)
    if not store.exists(key):
        store.put(key, blob)
    base = state.rounds.round_info("f", round_no).base_version
    raw = Envelope("f", round_no, device, key, hashlib.sha256(blob).hexdigest(), n, base).encode()
    return [ingestor.ingest(raw).outcome for _ in range(times)]


def _version(store, config, version):
    return {k: v.double().numpy() for k, v in versions.load_weights(store, "f", version, config.spec, 1 << 26,
                                                                     1 << 20).items()}


@pytest.mark.parametrize("agg", [AggregationConfig(), AggregationConfig(optimizer="adam"),
                                 AggregationConfig(drift_control="scaffold"), AggregationConfig(lora="ffa")],
                         ids=["fedavg", "fedadam", "scaffold", "ffa"])
def test_partials_equal_the_streaming_close_with_redeliveries_and_a_worker_killed_between_partials(tmp_path, agg):
    devices = [f"d{i:02d}" for i in range(40)]
    folded = _world(tmp_path, "folded", agg, devices)
    streamed = _world(tmp_path, "streamed", AggregationConfig(**{**agg.__dict__, "incremental": False}), devices)
    for round_no in (1, 2):  # round 1 learns its cap from its first 32 updates, round 2 from round 1
        rng = np.random.default_rng(round_no)
        state, store, config, coordinator = folded
        workers = [PartialFolder(state, store, batch=4, tail=0, idle_s=60) for _ in range(3)]
        claims = [int(n) for n in rng.integers(5, 320 + 80 * round_no, len(devices))]  # a cap that drifts
        claims[7] = 10**5  # far above any cap
        for i, device in enumerate(devices):
            delta = random_deltas(config.update_tensors, np.random.default_rng([round_no, i]), 0.01)
            folder = workers[i % 3]
            outcomes = _send(state, store, config, Ingestor(state, store, Settings(), folder=folder), round_no,
                             device, delta, claims[i], times=2 if i % 5 == 0 else 1)
            assert outcomes[0] == "accepted" and all(o == "redelivered" for o in outcomes[1:])
            s_state, s_store, s_config, _ = streamed
            _send(s_state, s_store, s_config, Ingestor(s_state, s_store, Settings()), round_no, device, delta,
                  claims[i])
            if i == 30:
                workers[2] = PartialFolder(state, store, batch=4, tail=0, idle_s=60)  # the old one died: its
                # uncommitted folds are lost with it, and their updates stay unfolded
        workers[0].flush()  # one worker commits what it holds; worker 1's last folds stay uncommitted
        unfolded = len(state.partials.unfolded("f", round_no))
        assert state.partials.partial_entries("f", round_no) and unfolded
        NOW[0] += 10**6  # past the deadline
        results = [w[3].close("f", round_no) for w in (folded, streamed)]
        assert [r.decision for r in results] == [CLOSED, CLOSED]
        manifest, reference = results[0].manifest, results[1].manifest
        assert manifest["aggregation"]["partials"] >= 3
        assert manifest["aggregation"]["read_at_close"] < len(devices) / 2
        if round_no == 1:  # the first 31 were folded before the cap was known: those above it are re-read
            assert manifest["aggregation"]["read_at_close"] > unfolded
        else:  # round 2's cap was fixed when it opened: only what no partial holds is read
            assert manifest["aggregation"]["read_at_close"] == unfolded
        assert reference["aggregation"]["read_at_close"] == len(devices)
        assert manifest["contributors"] == reference["contributors"] == devices
        for field in ("total_samples", "update_norms", "weight_cap", "train_seconds_mean"):
            assert manifest[field] == pytest.approx(reference[field], rel=1e-9), field
        assert manifest["total_weight"] == pytest.approx(reference["total_weight"], rel=1e-12)
        ours, theirs = _version(store, config, round_no), _version(streamed[1], config, round_no)
        for k in ours:
            np.testing.assert_allclose(ours[k], theirs[k], atol=1e-6, rtol=0)
        # a commit after the close began is refused; the close already counted those updates
        assert workers[1].state.partials.commit_partial("f", round_no, "late", {"x": 1}, []) == REFUSED
        # the next round's cap derives from this round's median claim, fixed before anyone submits
        assert state.rounds.round_info("f", round_no + 1).reference_claim == float(np.median(claims))


def test_a_member_is_never_committed_in_two_partials(tmp_path):
    state, store, config, _ = _world(tmp_path, "w", AggregationConfig(), ["a", "b"])
    delta = random_deltas(config.update_tensors, np.random.default_rng(0), 0.01)
    _send(state, store, config, Ingestor(state, store, Settings()), 1, "a", delta, 10)
    assert state.partials.commit_partial("f", 1, "s1", {"gen": 1}, ["a"]) == COMMITTED
    assert state.partials.commit_partial("f", 1, "s1", {"gen": 1}, ["a"]) == ALREADY  # the same commit, retried
    with pytest.raises(RuntimeError, match="already folded"):
        state.partials.commit_partial("f", 1, "s2", {"gen": 1}, ["a"])
    assert state.partials.unfolded("f", 1) == []


def test_retention_deletes_updates_and_partials_of_due_rounds_and_never_a_version(tmp_path):
    from fleettune.shared.pipeline import retention

    devices = [f"d{i}" for i in range(6)]
    state, store, config, coordinator = _world(tmp_path, "r", AggregationConfig(), devices)
    folder = PartialFolder(state, store, batch=2, tail=0, idle_s=60)
    for round_no in (1, 2):
        for i, device in enumerate(devices):
            delta = random_deltas(config.update_tensors, np.random.default_rng([round_no, i]), 0.01)
            _send(state, store, config, Ingestor(state, store, Settings(), folder=folder), round_no, device, delta, 10)
        NOW[0] += 10**6
        assert coordinator.close("f", round_no).decision == CLOSED
        if round_no == 1:
            ended = NOW[0]
    version_files = sorted(p for p in (tmp_path / "r").rglob("*") if "versions" in p.parts and p.is_file())
    assert len(version_files) >= 9  # v0, v1, v2: adapter, config, manifest
    assert list((tmp_path / "r" / "partials" / "f" / "000001").iterdir())

    assert retention.prune(state, store, ended + state.retention_s - 1) == (0, 0)  # within the retention
    # 6 updates and 1 partial: each commit of a slot deletes the generation it supersedes
    assert retention.prune(state, store, ended + state.retention_s + 1) == (1, 6 + 1)
    assert not list((tmp_path / "r" / "updates" / "f" / "000001").glob("*"))
    assert not list((tmp_path / "r" / "partials" / "f" / "000001").glob("*"))
    for key in (keys.round_updates, keys.round_claims, keys.round_unfolded, keys.round_partials, keys.round_cohort):
        assert not state.r.exists(key("f", 1)), key.__name__
    assert state.r.exists(keys.round_updates("f", 2))  # round 2 ended later: not yet due
    assert list((tmp_path / "r" / "partials" / "f" / "000002").iterdir())
    assert sorted(p for p in (tmp_path / "r").rglob("*") if "versions" in p.parts and p.is_file()) == version_files
    assert versions.current_version(store, "f") == 2


def test_a_commit_whose_reply_was_lost_is_not_offered_twice(tmp_path, monkeypatch):
    devices = ["a", "b", "c"]
    state, store, config, coordinator = _world(tmp_path, "lost", AggregationConfig(), devices)
    folder = PartialFolder(state, store, batch=2, tail=0, idle_s=60)
    ingestor = Ingestor(state, store, Settings(), folder=folder)
    real = state.partials.commit_partial

    def commit_then_lose_the_reply(*args, **kwargs):
        real(*args, **kwargs)
        raise ConnectionError("reply lost")

    monkeypatch.setattr(state.partials, "commit_partial", commit_then_lose_the_reply)
    deltas = [random_deltas(config.update_tensors, np.random.default_rng(i), 0.01) for i in range(3)]
    for i in (0, 1):  # the second fills the batch: its commit lands, its reply does not
        _send(state, store, config, ingestor, 1, devices[i], deltas[i], 10)
    monkeypatch.undo()
    _send(state, store, config, ingestor, 1, "c", deltas[2], 10)
    folder.flush()
    assert state.partials.unfolded("f", 1) == []
    assert state.partials.partial_entries("f", 1)[folder._open[("f", 1)].slot]["stats"]["count"] == 3
    NOW[0] += 10**6
    closed = coordinator.close("f", 1)
    assert closed.manifest["aggregation"]["read_at_close"] == 0 and closed.manifest["total_weight"] == 30


def test_the_accept_completing_the_first_32_claims_fixes_the_rounds_reference_claim(tmp_path):
    devices = [f"d{i:02d}" for i in range(40)]
    state, store, config, _ = _world(tmp_path, "ref", AggregationConfig(), devices)
    claims = [7 * i % 300 + 5 for i in range(40)]
    ingestor = Ingestor(state, store, Settings())
    for i, device in enumerate(devices):
        delta = random_deltas(config.update_tensors, np.random.default_rng(i), 0.01)
        _send(state, store, config, ingestor, 1, device, delta, claims[i])
        expected = float(np.median(claims[:32])) if i >= 31 else None
        assert state.rounds.round_info("f", 1).reference_claim == expected
    assert state.partials.uncapped("f", 1) == sorted(devices[:31])  # folded before the cap was known
