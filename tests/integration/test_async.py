"""Async (FedBuff) rounds end to end: the SDK, the API process, real Redis, S3 and Celery workers."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from fleettune import DeviceClient, Federation, FleettuneAPIError
from fleettune.shared.federation import FederationConfig
from fleettune.shared.protocol import versions
from fleettune.shared.protocol.updates import encode_update
from tests.reference import random_deltas

pytestmark = pytest.mark.services


def _wait_version(pipeline, fed: str, version: int, timeout: float = 90) -> dict:
    """The manifest of `version` once the buffer that publishes it has closed."""
    end = time.monotonic() + timeout
    while True:
        status = pipeline.runtime.state.federations.status(fed)
        if int(status.get("version", 0)) >= version:
            return versions.manifest(pipeline.runtime.store, fed, version)
        if time.monotonic() > end:
            raise TimeoutError(f"{fed} still at v{status.get('version')} after {timeout}s, waiting for v{version}")
        time.sleep(0.1)


def test_a_slow_device_joins_a_later_buffer_and_an_old_buffer_publishes_what_it_holds(pipeline):
    fed = f"async-{uuid.uuid4().hex[:8]}"
    admin = Federation(pipeline.admin_key, fed, pipeline.api_url)
    admin.train(model="tiny-llama", rounds=10, min_updates=1,
                round_config={"mode": "async", "buffer_size": 2, "max_staleness": 3, "timeout_seconds": 8})
    devices = {d: DeviceClient(admin.register_device(d), fed, pipeline.api_url) for d in ("fast-a", "fast-b", "slow")}
    config = FederationConfig.from_json(pipeline.runtime.redis.get(f"ft:fed:{fed}:config"))
    rng = np.random.default_rng(7)

    def send(device: str, plan: dict) -> dict:
        blob = encode_update(random_deltas(config.spec.tensors, rng, 0.01))
        receipt = devices[device].send(plan, blob, num_samples=10)
        return devices[device].wait_outcome(receipt["receipt"], timeout=60)

    slow_plan = devices["slow"].check_in()  # trains from v0 while the fast ones publish v1
    assert (slow_plan["round"], slow_plan["base_version"]) == (1, 0)
    for device in ("fast-a", "fast-b"):
        assert send(device, devices[device].check_in())["status"] == "accepted"
    assert _wait_version(pipeline, fed, 1)["contributors"] == ["fast-a", "fast-b"]

    # the slow update arrives after its buffer published (and past its deadline): it joins buffer 2
    assert send("slow", slow_plan)["status"] == "accepted"
    update = pipeline.runtime.state.rounds.updates(fed, 2)["slow"]
    assert (update.staleness, round(update.staleness_weight, 6)) == (1, round(2 ** -0.5, 6))
    with pytest.raises(FleettuneAPIError) as refused:  # its update holds its place in the open buffer
        devices["slow"].check_in()
    assert refused.value.code == "up_to_date"

    plan = devices["fast-a"].check_in()
    assert (plan["round"], plan["base_version"]) == (2, 1)
    assert send("fast-a", plan)["status"] == "accepted"
    assert _wait_version(pipeline, fed, 2)["contributors"] == ["fast-a", "slow"]

    # one update per device per base version: the check-in says so before any training
    assert send("fast-b", devices["fast-b"].check_in())["status"] == "accepted"
    with pytest.raises(FleettuneAPIError) as refused:
        devices["fast-b"].check_in()
    assert refused.value.status == 409 and refused.value.code == "up_to_date"
    # buffer 3 holds one update (below buffer_size 2, at min_updates 1): it publishes at its age limit
    started = time.monotonic()
    assert _wait_version(pipeline, fed, 3, timeout=90)["contributors"] == ["fast-b"]
    assert time.monotonic() - started < 60
    stats = pipeline.runtime.state.federations.stats(fed)
    assert (stats.get("accepted"), stats.get("rejected", 0)) == (5, 0)
