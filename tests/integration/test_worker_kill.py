"""A worker SIGKILLed while it holds updates: its messages come back and count exactly once."""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis

from fleettune.workers.local import services
from tests.integration.conftest import make_pipeline
from tests.reference import next_global, random_deltas

pytestmark = pytest.mark.services

DEVICES = [f"edge-{i:02d}" for i in range(20)]


def _unacked(broker: redis.Redis) -> int:
    return broker.hlen("unacked")


def test_round_completes_and_counts_each_update_once_after_a_worker_is_killed(redis_url, s3_endpoint, workdir):
    # A separate Redis database: this test's broker queues and state are its own.
    env = services.service_env(redis_url.rsplit("/", 1)[0] + "/3", s3_endpoint, bucket="fleettune-kill")
    pipeline = make_pipeline(env)
    broker = redis.Redis.from_url(env["FLEETTUNE_REDIS_URL"])
    # 1B-class layout: 6.8 MB per update, so the victim is still busy when it dies
    config = pipeline.create(devices=DEVICES, layout="llama-1b", max_rounds=1, max_update_norm=1.0)
    victim = services.Worker("victim", env, workdir, concurrency=2)

    rng = np.random.default_rng(3)
    deltas = [random_deltas(config.spec.tensors, rng, s) for s in np.geomspace(1e-4, 1e-3, len(DEVICES))]
    samples = [int(n) for n in rng.integers(10, 100, len(DEVICES))]
    for device, delta, n in zip(DEVICES, deltas, samples):
        pipeline.submit(config, 1, device, delta, num_samples=n)

    deadline = time.monotonic() + 60
    while _unacked(broker) == 0:
        assert time.monotonic() < deadline, "victim never took a message"
        time.sleep(0.002)
    victim.kill()
    held = _unacked(broker)
    accepted_before = pipeline.runtime.state.federations.stats(config.name).get("accepted", 0)
    assert held >= 1 and accepted_before < len(DEVICES)

    survivor = services.Worker("survivor", env, workdir, concurrency=2)
    try:
        info = pipeline.wait_round(config, 1, timeout=90)  # after the visibility timeout (10 s here)
    finally:
        survivor.stop()

    assert info.status == "closed"
    stats = pipeline.runtime.state.federations.stats(config.name)
    assert stats["accepted"] == stats["received"] == len(DEVICES)
    actual = pipeline.version_arrays(config, 1)
    reference = next_global(pipeline.version_arrays(config, 0), deltas, samples, 1.0,
                            config.policy.max_num_samples, config.policy.server_lr)
    worst = max(float(np.max(np.abs(actual[k] - reference[k]))) for k in reference)
    assert worst <= 1e-6
