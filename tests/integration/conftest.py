"""Session-wide real services: redis-server, SeaweedFS S3, and two Celery worker processes."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from fleettune.shared.protocol import versions
from fleettune.shared.protocol.adapter_spec import LAYOUTS, AdapterConfig
from fleettune.shared.control.auth import Tokens
from fleettune.shared.federation import FederationConfig, RoundPolicy
from fleettune.shared.runtime import Runtime
from fleettune.shared.settings import Settings
from fleettune.shared.strategies.config import AggregationConfig
from fleettune.shared.protocol.updates import encode_update, submit_update
from fleettune.workers.local import services
from fleettune.workers.local.harness import wait_settled
from fleettune.workers.worker.app import enqueuer, make_app

pytestmark = pytest.mark.services
_names = itertools.count(1)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def redis_url(workdir):
    with services.redis_server(workdir) as url:
        yield url


@pytest.fixture(scope="session")
def s3_endpoint(workdir):
    with services.s3_server(workdir) as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def env(redis_url, s3_endpoint) -> dict[str, str]:
    return services.service_env(redis_url, s3_endpoint, bucket="fleettune-it")


@pytest.fixture(scope="session")
def workers(env, workdir):
    """Two workers of two pool processes each: `fleettune worker --beat` and plain `celery worker`."""
    started = [services.Worker("w1", env, workdir, beat=True, via_cli=True), services.Worker("w2", env, workdir)]
    yield started
    for w in started:
        w.stop()


@pytest.fixture(scope="session")
def api(env, workdir):
    """`fleettune api` as a process in front of the same Redis and S3."""
    server = services.Api(env, workdir)
    yield server
    server.stop()


@dataclasses.dataclass
class Pipeline:
    """The test's view of a running deployment: a producer app plus direct state and store access."""

    settings: Settings
    runtime: Runtime
    app: object
    api_url: str = ""
    admin_key: str = ""

    def create(self, *, devices: list[str], layout: str = "tiny-llama", evaluation=None,
               aggregation: AggregationConfig = AggregationConfig(), adapter: AdapterConfig | None = None,
               exports: tuple[str, ...] = (), base_model: str | None = None, **policy) -> FederationConfig:
        config = FederationConfig(
            name=f"it-{next(_names)}-{int(time.time() * 1000) % 10**8}", model=LAYOUTS[layout],
            adapter=adapter or AdapterConfig(rank=8, alpha=16), base_model=base_model or layout,
            evaluation=evaluation, exports=exports,
            policy=RoundPolicy(**{"min_updates": 2, "timeout_seconds": 120, "max_rounds": 5, **policy}),
            aggregation=aggregation,
        )
        self.runtime.coordinator.start(config, devices)
        return config

    def enqueue(self, raw: bytes) -> None:
        enqueuer(self.app)(raw)

    def submit(self, config: FederationConfig, round_no: int, device: str, arrays: Mapping[str, np.ndarray] | None = None,
               *, blob: bytes | None = None, num_samples: int = 10, base_version: int | None = None, times: int = 1):
        if blob is None:
            blob = encode_update(arrays)
        if base_version is None:
            base_version = self.runtime.state.rounds.round_info(config.name, round_no).base_version
        enqueue = lambda raw: [self.enqueue(raw) for _ in range(times)]  # noqa: E731
        return submit_update(self.runtime.store, enqueue, federation=config.name, round_no=round_no, device=device,
                             blob=blob, base_version=base_version, num_samples=num_samples, train_seconds=1.5,
                             metrics={"loss": 2.0, "steps": 4})

    def wait_round(self, config: FederationConfig, round_no: int, timeout: float = 60):
        return wait_settled(self.runtime.state, config.name, round_no, timeout)

    def wait_received(self, fed: str | None, count: int, timeout: float = 60) -> dict[str, int]:
        end = time.monotonic() + timeout
        while True:
            stats = self.runtime.state.federations.stats(fed)
            if stats.get("received", 0) >= count:
                return stats
            if time.monotonic() > end:
                raise TimeoutError(f"received {stats.get('received', 0)} of {count}: {stats}")
            time.sleep(0.05)

    def version_arrays(self, config: FederationConfig, version: int) -> dict[str, np.ndarray]:
        from safetensors.numpy import load

        return load(self.runtime.store.get(f"{versions.keys.version_prefix(config.name, version)}/{versions.ADAPTER_FILE}"))


def make_pipeline(env: dict[str, str], api_url: str = "") -> Pipeline:
    settings = Settings.from_env(env)
    runtime = Runtime.from_settings(settings)
    admin_key = Tokens(runtime.redis).create_api_key("admin", "tests")[1]
    return Pipeline(settings, runtime, make_app(settings), api_url, admin_key)


@pytest.fixture(scope="session")
def pipeline(env, workers, api) -> Pipeline:
    return make_pipeline(env, api.url)
