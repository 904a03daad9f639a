"""schemathesis against the served OpenAPI, every check on: generated valid and invalid requests get
no 5xx, only documented status codes and content types, responses that match their schemas, and
invalid data is refused while valid data is accepted.

It runs against its own `fleettune api` process on its own Redis database and bucket, as an admin
and as a device, so what it creates and deletes touches nothing else. FLEETTUNE_FUZZ_EXAMPLES
raises the per-operation example count (CI keeps it small).

One allowance, said here rather than hidden: schema-valid data may meet a rule the schema cannot
express (a model id that is not registered, a strategy that contradicts the adapter, a rollout of a
version not published: 422), or a bound the operator configures (FLEETTUNE_MAX_UPDATE_BYTES: 413);
each answer names its own `code`. A 422 `invalid_request` (the request's shape) on schema-valid
data is a failure: schema and validation must agree.
"""

from __future__ import annotations

import os

import msgpack
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance

from fleettune import Federation
from fleettune.shared.control.auth import Tokens
from fleettune.shared.runtime import Runtime
from fleettune.shared.settings import Settings
from fleettune.workers.local import services

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
    federation.train(model="tiny-llama", rounds=1000, min_updates=1000, wait_started=None)
    # no worker serves this database: the start a worker would do (v0, round 1), done here
    Runtime.from_settings(Settings.from_env(env)).coordinator.start_requested("fuzzed")
    yield api, {"admin": admin, "device": device}
    api.stop()


def _business_rules_aside(ctx, response, case):
    """positive_data_acceptance, but for a 422 or 413 that names a rule or bound the schema cannot express."""
    if response.status_code in (413, 422):
        try:
            code = response.json().get("code")
        except ValueError:
            code = None
        if code and code != "invalid_request":
            return None
    return positive_data_acceptance(ctx, response, case)


def _split_unavailable_aside(ctx, response, case):
    """not_a_server_error, but for 503 split_unavailable: this API runs without a split server."""
    if response.status_code == 503 and "split_unavailable" in response.text:
        return None
    return not_a_server_error(ctx, response, case)


@schemathesis.serializer("application/msgpack")
def _msgpack(ctx, value) -> bytes:
    """Secure-aggregation stage bodies: the schema says bytes; anything else goes as msgpack of it."""
    return value if isinstance(value, bytes) else msgpack.packb(value, use_bin_type=True)


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_every_check_passes_on_generated_requests(fuzz_api, mode):
    api, tokens = fuzz_api
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    calls, failures = 0, []
    for result in schema.get_all_operations():
        operation = result.ok()
        as_device = any(s in operation.path for s in ("check-in", "upload-url", "updates", "receipts", "reports",
                                                      "split/", "identity", "secagg/"))
        token = tokens["device" if as_device else "admin"]
        path_parameters = {"name": "fuzzed"} if as_device else None

        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
        def run(case):
            nonlocal calls
            calls += 1
            # the schema requires Authorization: a case generated with it gets the real token in its
            # place; a negative case whose invalidity is leaving it out is sent without one (a token
            # added back would make it valid, and its 200 would read as invalid data accepted)
            dropped = "authorization" not in {k.lower() for k in (case.headers or {})}
            headers = {} if dropped and mode == schemathesis.GenerationMode.NEGATIVE else {
                "Authorization": f"Bearer {token}"}
            case.call_and_validate(base_url=api.url, headers=headers, timeout=30,
                                   excluded_checks=[positive_data_acceptance, not_a_server_error],
                                   additional_checks=[_business_rules_aside, _split_unavailable_aside])

        try:
            run()
        except Unsatisfiable:  # an operation with nothing to make invalid (no parameters, no body)
            assert mode == schemathesis.GenerationMode.NEGATIVE
        except (Exception, BaseExceptionGroup) as failed:  # schemathesis names each failed check; list them all
            failures.append(f"{operation.method.upper()} {operation.path}: {str(failed)[:4000]}")  # the head names the response
    assert calls >= 28, calls
    assert failures == [], "\n\n".join(failures[:5])
    assert api.proc.poll() is None  # the server is still up
