"""schemathesis against the served OpenAPI: generated valid and invalid requests, never a 5xx.

It runs against its own `fleettune api` process on its own Redis database and bucket, as an admin
and as a device, so what it creates and deletes touches nothing else. FLEETTUNE_FUZZ_EXAMPLES
raises the per-operation example count (CI keeps it small).
"""

from __future__ import annotations

import os

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from fleettune import Federation
from fleettune.shared.control.auth import Tokens
from tests import services

pytestmark = pytest.mark.services
EXAMPLES = int(os.environ.get("FLEETTUNE_FUZZ_EXAMPLES", "15"))


@pytest.fixture(scope="module")
def fuzz_api(redis_url, s3_endpoint, workdir):
    env = services.service_env(redis_url.rsplit("/", 1)[0] + "/6", s3_endpoint, bucket="fleettune-fuzz")
    api = services.Api(env, workdir)
    admin = Tokens(redis.Redis.from_url(env["FLEETTUNE_REDIS_URL"])).create_api_key("admin", "fuzz")[1]
    federation = Federation(admin, "fuzzed", api.url)
    federation.create(model="tiny-llama")
    device = federation.register_device("fuzzer", ram_mb=4096, storage_mb=4096)
    federation.train(model="tiny-llama", rounds=1000, min_updates=1000)
    yield api, {"admin": admin, "device": device}
    api.stop()


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_no_generated_request_gets_a_server_error(fuzz_api, mode):
    api, tokens = fuzz_api
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    calls, failures = 0, []
    for result in schema.get_all_operations():
        operation = result.ok()
        as_device = any(s in operation.path for s in ("check-in", "upload-url", "updates", "receipts", "reports",
                                                      "split/"))
        token = tokens["device" if as_device else "admin"]
        path_parameters = {"name": "fuzzed"} if as_device else None

        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
        def run(case):
            nonlocal calls
            response = case.call(base_url=api.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
            calls += 1
            # this API runs without a split server: its honest answer to a split step is 503
            unavailable = response.status_code == 503 and "split_unavailable" in response.text
            if response.status_code >= 500 and not unavailable:
                failures.append(f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:200]}")

        try:
            run()
        except Unsatisfiable:  # an operation with nothing to make invalid (no parameters, no body)
            assert mode == schemathesis.GenerationMode.NEGATIVE
    assert calls >= 28, calls
    assert failures == [], failures[:5]
    assert api.proc.poll() is None  # the server is still up
