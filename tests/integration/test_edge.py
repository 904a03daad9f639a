"""The API's public edge under a real server: no body is read before authentication, every body is
bounded while it streams, /metrics survives every federation state and is for operators only, and
the gateway's JSON is strict."""

from __future__ import annotations

import itertools
import json
import socket
import time
import urllib.parse

import httpx
import pytest

from fleettune import DeviceClient, Federation
from fleettune.shared.control.auth import Tokens

pytestmark = pytest.mark.services
MiB = 1024 * 1024
_names = itertools.count(1)


def _name(prefix: str) -> str:
    return f"{prefix}-{next(_names)}-{int(time.time() * 1000) % 10**7}"


def _peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _raw_post(url: str, path: str, size: int, token: str | None = None, chunked: bool = False) -> tuple[int, dict]:
    """POST `size` bytes as fast as the server takes them; (status, problem body). The server may
    answer and close before the body is sent: that is the point."""
    parsed = urllib.parse.urlsplit(url)
    head = [f"POST {path} HTTP/1.1", f"Host: {parsed.netloc}", "Content-Type: application/json", "Connection: close"]
    head += ["Transfer-Encoding: chunked"] if chunked else [f"Content-Length: {size}"]
    if token:
        head.append(f"Authorization: Bearer {token}")
    with socket.create_connection((parsed.hostname, parsed.port), timeout=30) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        chunk, sent = b"x" * MiB, 0
        try:
            while sent < size:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                sent += len(chunk)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server refused without reading the rest
        reply = b""
        try:
            while data := sock.recv(65536):
                reply += data
        except ConnectionResetError:
            pass
    status = int(reply.split(b" ", 2)[1])
    body = reply.split(b"\r\n\r\n", 1)[1]
    return status, json.loads(body) if body.startswith(b"{") else {}


def test_a_64_mib_body_without_a_token_is_refused_unread(pipeline, api):
    before = _peak_rss(api.proc.pid)
    status, body = _raw_post(pipeline.api_url, "/api/v1/federations/anyone/updates", 64 * MiB)
    assert (status, body["code"]) == (401, "unauthenticated")
    status, body = _raw_post(pipeline.api_url, "/api/v1/training-sessions", 64 * MiB, token="ftk_" + "0" * 16 + "_x")
    assert status == 401
    assert _peak_rss(api.proc.pid) - before < 10 * MiB


def test_bodies_over_their_routes_bound_are_refused_with_413_declared_or_streamed(pipeline, api):
    fed = _name("edge")
    federation = Federation(pipeline.admin_key, fed, pipeline.api_url)
    federation.create(model="tiny-llama")
    token = federation.register_device("phone", ram_mb=8192, storage_mb=4096)
    before = _peak_rss(api.proc.pid)
    for path, key in ((f"/api/v1/federations/{fed}/updates", token), ("/api/v1/training-sessions", pipeline.admin_key)):
        status, body = _raw_post(pipeline.api_url, path, 64 * MiB, token=key)
        assert (status, body["code"]) == (413, "body_too_large"), path
        status, body = _raw_post(pipeline.api_url, path, 4 * MiB, token=key, chunked=True)  # no Content-Length
        assert (status, body["code"]) == (413, "body_too_large"), path
    assert _peak_rss(api.proc.pid) - before < 10 * MiB
    # a device route's bound is a few KiB: its JSON has a handful of fields
    device = DeviceClient(token, fed, pipeline.api_url)
    refused = device.client.http.post(f"/api/v1/federations/{fed}/check-in", json={"tier": "x" * 20_000})
    assert refused.status_code == 413


def test_metrics_survive_federations_never_trained_and_are_for_operators(pipeline):
    created, adapted = _name("bare"), _name("adapter")
    with httpx.Client(base_url=pipeline.api_url, headers={"Authorization": f"Bearer {pipeline.admin_key}"},
                      timeout=30) as http:
        assert http.post("/api/v1/federations", json={"name": created}).status_code == 201
        assert http.put(f"/api/v1/federations/{adapted}/adapter", json={"type": "lora", "rank": 4}).status_code == 201
        token = http.post(f"/api/v1/federations/{created}/devices", json={"device_id": "p1"}).json()["token"]
        scraped = http.get("/metrics")
    assert scraped.status_code == 200, scraped.text
    for fed in (created, adapted):
        assert f'fleettune_adapter_version{{federation="{fed}"}} 0.0' in scraped.text
    assert httpx.get(f"{pipeline.api_url}/metrics").status_code == 401
    as_device = httpx.get(f"{pipeline.api_url}/metrics", headers={"Authorization": f"Bearer {token}"})
    assert as_device.status_code == 403
    read_key = Tokens(pipeline.runtime.redis).create_api_key("read", "prometheus")[1]
    assert httpx.get(f"{pipeline.api_url}/metrics", headers={"Authorization": f"Bearer {read_key}"}).status_code == 200


def test_the_gateway_json_is_strict(pipeline):
    fed = _name("strict")
    federation = Federation(pipeline.admin_key, fed, pipeline.api_url)
    federation.create(model="tiny-llama")
    device = DeviceClient(federation.register_device("phone", ram_mb=8192, storage_mb=4096), fed, pipeline.api_url)
    federation.train(model="tiny-llama", rounds=1, min_updates=1)
    plan = device.check_in(ram_mb=8192, storage_mb=4096)
    good = {"round": plan["round"], "sha256": "a" * 64, "num_samples": 12, "base_version": 0}
    for field, value in (("round", True), ("num_samples", "12"), ("base_version", 0.5), ("sha256", 7)):
        answer = device.client.http.post(f"/api/v1/federations/{fed}/updates", json=dict(good, **{field: value}))
        assert answer.status_code == 422, (field, answer.text)
        assert field in answer.json()["detail"]
    integral = device.client.http.post(f"/api/v1/federations/{fed}/updates", json=dict(good, num_samples=12.0))
    assert integral.status_code == 202  # JSON has one number type: 12.0 is the integer 12, as JSON Schema says
    for field, value in (("ram_mb", "8192"), ("ram_mb", True)):
        answer = device.client.http.post(f"/api/v1/federations/{fed}/check-in", json={field: value})
        assert answer.status_code == 422 and field in answer.json()["detail"], answer.text


def test_one_request_held_in_a_slow_redis_call_stalls_no_other(env, workdir, redis_url, pipeline):
    """The event loop never waits on Redis: a device whose submit's Redis script is held 3 s by a proxy
    in front of Redis does not delay 50 submits of another device on the same API process."""
    import hashlib
    import threading

    from fleettune.shared.protocol.adapter_spec import LAYOUTS
    from fleettune.shared.federation import FederationConfig, RoundPolicy
    from fleettune.workers.local import services

    fed = _name("loop")
    config = FederationConfig(fed, LAYOUTS["tiny-llama"], policy=RoundPolicy(min_updates=1000, timeout_seconds=600))
    pipeline.runtime.coordinator.start(config, ["slowpoke", "quick"])
    tokens = Tokens(pipeline.runtime.redis)
    slow, quick = (tokens.create_device_token(fed, d) for d in ("slowpoke", "quick"))
    proxy = services.DelayingProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]), b"slowpoke", delay=3.0)
    api = services.Api(dict(env, FLEETTUNE_REDIS_URL=f"redis://127.0.0.1:{proxy.port}/0"), workdir)
    finished: dict[str, float] = {}
    try:
        def held() -> None:  # its ledger entry names the device: that one Redis call is held
            answer = httpx.post(f"{api.url}/api/v1/federations/{fed}/updates", headers={"Authorization": f"Bearer {slow}"},
                                json={"round": 1, "sha256": "f" * 64, "num_samples": 10, "base_version": 0}, timeout=60)
            finished["slow"], finished["slow_code"] = time.monotonic(), answer.status_code

        thread = threading.Thread(target=held)
        thread.start()
        assert proxy.held.wait(30)
        with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {quick}"}, timeout=60) as http:
            codes = [http.post(f"/api/v1/federations/{fed}/updates", json={
                "round": 1, "sha256": hashlib.sha256(str(i).encode()).hexdigest(), "num_samples": 10,
                "base_version": 0}).status_code for i in range(50)]
        finished["quick"] = time.monotonic()
        thread.join(60)
    finally:
        api.stop()
        proxy.close()
    assert codes == [202] * 50 and finished["slow_code"] == 202
    assert finished["quick"] < finished["slow"]  # the 50 were answered while the slow call was still held


def test_the_rate_limit_counts_a_tokens_requests_and_no_strangers(env, workdir, pipeline):
    """Submits and check-ins share one window per token, whatever federation the path names; a forged
    token naming the same key id is refused without spending that device's budget; an operator key
    cannot submit."""
    from fleettune.shared.protocol.adapter_spec import LAYOUTS
    from fleettune.shared.federation import FederationConfig, RoundPolicy
    from fleettune.workers.local import services

    fed = _name("rate")
    config = FederationConfig(fed, LAYOUTS["tiny-llama"], policy=RoundPolicy(min_updates=1000, timeout_seconds=600))
    pipeline.runtime.coordinator.start(config, ["phone"])
    token = Tokens(pipeline.runtime.redis).create_device_token(fed, "phone")
    forged = token.rsplit("_", 1)[0] + "_" + "x" * 43  # the same key id, another secret
    api = services.Api(dict(env, FLEETTUNE_DEVICE_RATE_LIMIT="5", FLEETTUNE_RATE_WINDOW="3600"), workdir)
    try:
        with httpx.Client(base_url=api.url, timeout=30) as http:
            submit = lambda i, key: http.post(  # noqa: E731
                f"/api/v1/federations/{fed}/updates", headers={"Authorization": f"Bearer {key}"},
                json={"round": 1, "sha256": f"{i:064x}", "num_samples": 10, "base_version": 0})
            assert [submit(i, forged).status_code for i in range(10)] == [401] * 10
            assert submit(0, pipeline.admin_key).status_code == 403
            codes = [submit(i, token).status_code for i in range(3)]
            for name in (f"{fed}-elsewhere", fed):  # a path naming another federation opens no window of its own
                codes.append(http.post(f"/api/v1/federations/{name}/check-in", json={"ram_mb": 8192},
                                       headers={"Authorization": f"Bearer {token}"}).status_code)
            refused = submit(99, token)
        assert codes == [202, 202, 202, 403, 200]
        assert (refused.status_code, refused.json()["code"]) == (429, "rate_limited")
        assert int(refused.headers["Retry-After"]) > 0
    finally:
        api.stop()
