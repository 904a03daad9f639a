"""A round with more updates than one close task could read within its time limit still closes:
ingest processes fold updates into partial sums, so the close reduces a handful of them."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fleettune.shared.protocol import versions
from fleettune.shared.pipeline.round_inputs import RoundReader
from fleettune.shared.strategies.combine import RoundAggregator
from fleettune.workers.local import services
from tests.integration.conftest import make_pipeline
from tests.reference import next_global, random_deltas

pytestmark = pytest.mark.services
N = 1500
TIME_LIMIT_S = 1


def test_a_round_larger_than_the_close_task_time_limit_allows_still_closes(redis_url, s3_endpoint, workdir):
    env = services.service_env(redis_url.rsplit("/", 1)[0] + "/5", s3_endpoint, bucket="fleettune-scale",
                               FLEETTUNE_TASK_TIME_LIMIT=str(TIME_LIMIT_S), FLEETTUNE_VISIBILITY_TIMEOUT="30")
    pipeline = make_pipeline(env)
    devices = [f"p{i:05d}" for i in range(N)]
    config = pipeline.create(devices=devices, max_rounds=1, max_update_norm=1.0, timeout_seconds=600)
    rng = np.random.default_rng(11)
    deltas, samples = [], []
    for device in devices:
        deltas.append(random_deltas(config.spec.tensors, rng, 0.01))
        samples.append(int(rng.integers(10, 100)))
    workers = [services.Worker(f"scale{i}", env, workdir, concurrency=1) for i in range(2)]
    try:
        for device, delta, n in zip(devices, deltas, samples):
            pipeline.submit(config, 1, device, delta, num_samples=n)
        info = pipeline.wait_round(config, 1, timeout=240)
    finally:
        for w in workers:
            w.stop()

    assert info.status == "closed", info
    state, store = pipeline.runtime.state, pipeline.runtime.store
    manifest = versions.manifest(store, config.name, 1)
    assert len(manifest["contributors"]) == N and manifest["excluded"] == {}
    assert 1 <= manifest["aggregation"]["partials"] <= 8
    assert manifest["aggregation"]["read_at_close"] <= 64  # updates no partial held: a tail, not the round

    # the cap comes from the median of the first 32 accepted claims (see test_chaos's flood)
    reference = next_global(pipeline.version_arrays(config, 0), deltas, samples, 1.0,
                            config.policy.max_num_samples, config.policy.server_lr,
                            reference_claim=manifest["weight_cap"] / 2)
    actual = pipeline.version_arrays(config, 1)
    assert max(float(np.max(np.abs(actual[k] - reference[k]))) for k in reference) <= 1e-6

    # the premise: reading every update, as the streaming close does, takes longer than the limit
    base = versions.load_weights(store, config.name, 0, config.spec, 1 << 26, 1 << 20)
    started = time.perf_counter()
    RoundReader(state, store, pipeline.settings).stream(
        config, state.rounds.round_info(config.name, 1),
        RoundAggregator(config.aggregation, base, config.update_tensors, config.adapter.rank, config.adapter.alpha))
    assert time.perf_counter() - started > TIME_LIMIT_S
