"""Hostile and malformed inputs sent through the real queue: each gets its own reason, none kills a worker."""

from __future__ import annotations

import hashlib
import time

import msgpack
import numpy as np
import pytest

from fleettune.shared import keys
from fleettune.shared.protocol.envelope import Envelope
from fleettune.shared.errors import RejectReason
from tests import attacks
from tests.reference import random_deltas

pytestmark = pytest.mark.services


def _eventually(predicate, timeout: float = 30):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.05)


def _deadletter_reasons(pipeline, fed: str) -> dict[str, str]:
    return {e["device"]: e["reason"] for e in pipeline.runtime.state.accounting.deadletters(1000) if e["federation"] == fed}


def test_each_hostile_update_is_rejected_with_its_reason_and_counted(pipeline, workers):
    container_cases = {f"atk-{fn.__name__.replace('_', '-')}": (fn, reason)
                       for fn, reason in attacks.CONTAINER_ATTACKS.items()}
    envelope_cases = ["env-sha", "env-big-object", "env-missing-object", "env-bad-key", "env-base",
                      "env-few-samples", "env-future"]
    honest = ["honest-1", "honest-2"]
    config = pipeline.create(devices=list(container_cases) + envelope_cases + honest, max_rounds=2)
    store, fed = pipeline.runtime.store, config.name
    arrays = random_deltas(config.spec.tensors, np.random.default_rng(0), 0.01)

    for device, (attack, _) in container_cases.items():
        pipeline.submit(config, 1, device, blob=attack(arrays))

    good = attacks.valid(arrays)
    key = lambda device: keys.update_object(fed, 1, device)  # noqa: E731
    sha = hashlib.sha256(good).hexdigest()

    def envelope(device: str, **changes) -> bytes:
        fields = dict(federation=fed, round=1, device=device, object_key=key(device), sha256=sha,
                      num_samples=10, base_version=0)
        return Envelope(**{**fields, **changes}).encode()

    store.put(key("env-sha"), good)
    pipeline.enqueue(envelope("env-sha", sha256="0" * 64))
    big = b"\0" * (pipeline.settings.max_update_bytes + 1)
    store.put(key("env-big-object"), big)
    pipeline.enqueue(envelope("env-big-object", sha256=hashlib.sha256(big).hexdigest()))
    pipeline.enqueue(envelope("env-missing-object"))
    store.put(key("honest-1"), good)
    pipeline.enqueue(envelope("env-bad-key", object_key=key("honest-1")))  # points at another device's object
    for device in ("env-base", "env-few-samples", "env-future"):
        store.put(key(device), good)
    pipeline.enqueue(envelope("env-base", base_version=7))
    pipeline.enqueue(envelope("env-few-samples", num_samples=0))
    pipeline.enqueue(envelope("env-future", round=2, object_key=keys.update_object(fed, 2, "env-future")))
    pipeline.enqueue(envelope("not-enrolled"))  # a device outside the cohort
    pipeline.enqueue(envelope("honest-1", federation="no-such-federation"))

    expected_fed = len(container_cases) + len(envelope_cases) + 1  # + not-enrolled
    stats = pipeline.wait_received(fed, expected_fed)

    reasons = _deadletter_reasons(pipeline, fed)
    for device, (attack, reason) in container_cases.items():
        assert reasons.get(device) == reason.value, f"{attack.__name__}: {reasons.get(device)}"
    assert reasons["env-sha"] == RejectReason.SHA256_MISMATCH.value
    assert reasons["env-big-object"] == RejectReason.OBJECT_TOO_LARGE.value
    assert reasons["env-missing-object"] == RejectReason.OBJECT_MISSING.value
    assert reasons["env-bad-key"] == RejectReason.BAD_OBJECT_KEY.value
    assert reasons["env-base"] == RejectReason.WRONG_BASE_VERSION.value
    assert reasons["env-few-samples"] == RejectReason.TOO_FEW_SAMPLES.value
    assert reasons["env-future"] == RejectReason.FUTURE_ROUND.value
    assert reasons["not-enrolled"] == RejectReason.NOT_SELECTED.value
    assert stats["rejected"] == stats["received"] == expected_fed
    assert stats.get("accepted", 0) == 0
    assert stats[f"rejected:{RejectReason.NON_FINITE.value}"] == 2
    unknown = lambda: [e for e in pipeline.runtime.state.accounting.deadletters(1000)  # noqa: E731
                       if e["reason"] == "unknown_federation" and e["device"] == "honest-1"]
    _eventually(unknown)

    # the workers are alive and still accept honest updates; the round then closes normally
    assert all(w.alive() for w in workers)
    for device in honest:
        pipeline.submit(config, 1, device, arrays)
    pipeline.wait_received(fed, expected_fed + 2)
    assert pipeline.runtime.state.federations.stats(fed)["accepted"] == 2


def test_malformed_and_oversized_envelopes_are_rejected_and_counted_globally(pipeline, workers):
    before = pipeline.runtime.state.federations.stats(None)
    too_big = msgpack.packb({"v": 1, "padding": "x" * (pipeline.settings.max_envelope_bytes + 10)})
    cases = {
        b"\xc1\xc1\xc1 not msgpack": RejectReason.MALFORMED_ENVELOPE,
        msgpack.packb([1, 2, 3]): RejectReason.MALFORMED_ENVELOPE,
        msgpack.packb({"v": 1, "federation": "../etc", "round": 1}): RejectReason.MALFORMED_ENVELOPE,
        too_big: RejectReason.ENVELOPE_TOO_LARGE,
        msgpack.packb({"v": 99}): RejectReason.UNSUPPORTED_SCHEMA,
    }
    for raw in cases:
        pipeline.enqueue(raw)
    pipeline.enqueue("a string, not bytes")

    after = pipeline.wait_received(None, before.get("received", 0) + len(cases) + 1)
    for reason in set(cases.values()):
        expected = sum(1 for r in cases.values() if r == reason) + (reason == RejectReason.MALFORMED_ENVELOPE)
        key = f"rejected:{reason.value}"
        assert after.get(key, 0) - before.get(key, 0) == expected, reason
    assert all(w.alive() for w in workers)


def test_an_update_for_a_closed_round_is_rejected_as_stale(pipeline):
    devices = ["a", "b"]
    config = pipeline.create(devices=devices, max_rounds=3)
    rng = np.random.default_rng(1)
    for device in devices:
        pipeline.submit(config, 1, device, random_deltas(config.spec.tensors, rng, 0.01))
    assert pipeline.wait_round(config, 1).status == "closed"

    late = pipeline.submit(config, 1, "a", random_deltas(config.spec.tensors, rng, 0.01), base_version=0,
                           num_samples=11)
    stats = pipeline.wait_received(config.name, 3)
    assert stats["rejected:stale_round"] == 1
    assert late.round == 1 and pipeline.runtime.state.federations.current_round(config.name) == 2


def test_a_round_without_quorum_fails_at_its_deadline_and_the_next_reopens_from_the_same_version(pipeline):
    devices = ["p", "q", "r", "s"]
    config = pipeline.create(devices=devices, min_updates=3, timeout_seconds=2, max_rounds=3)
    rng = np.random.default_rng(2)
    for device in devices[:2]:
        pipeline.submit(config, 1, device, random_deltas(config.spec.tensors, rng, 0.01))

    failed = pipeline.wait_round(config, 1, timeout=30)  # closed by beat's deadline sweep

    assert failed.status == "failed" and failed.reason == "no_quorum"
    assert failed.version is None
    # the next round opens after the failure is recorded (a step of its own): wait for it, to a deadline
    end = time.monotonic() + 30
    while (reopened := pipeline.runtime.state.rounds.round_info(config.name, 2)) is None and time.monotonic() < end:
        time.sleep(0.05)
    assert reopened is not None and reopened.status == "open" and reopened.base_version == 0
    for device in devices[:3]:
        pipeline.submit(config, 2, device, random_deltas(config.spec.tensors, rng, 0.01))
    closed = pipeline.wait_round(config, 2, timeout=30)  # quorum, then the deadline
    assert closed.status == "closed" and closed.version == 1
