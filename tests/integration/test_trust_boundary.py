"""The trust boundary, tried as a hostile device would: no device reaches data that is not its own.

Against the real API process and SeaweedFS (which enforces the signed headers), plus an auth
matrix over every route the served OpenAPI lists.
"""

from __future__ import annotations

import hashlib
import re
import time
import urllib.parse

import httpx
import numpy as np
import pytest

from fleettune import DeviceClient, Federation
from fleettune.shared.control.auth import Tokens
from fleettune.shared.protocol.updates import encode_update
from tests.reference import random_deltas

pytestmark = pytest.mark.services
PHONE = {"ram_mb": 8192, "storage_mb": 4096}


@pytest.fixture(scope="module")
def fleet(pipeline):
    """Two federations; alice and bob in the first (with an open round), carol in the second."""
    suffix = int(time.time() * 1000) % 10**7
    first, second = f"tb-a-{suffix}", f"tb-b-{suffix}"
    tokens = {}
    for fed, devices in ((first, ("alice", "bob", "mallory")), (second, ("carol",))):
        federation = Federation(pipeline.admin_key, fed, pipeline.api_url)
        federation.create(model="tiny-llama")
        tokens |= {d: federation.register_device(d, **PHONE) for d in devices}
    Federation(pipeline.admin_key, first, pipeline.api_url).train(model="tiny-llama", rounds=2, min_updates=2)
    revoked = Federation(pipeline.admin_key, first, pipeline.api_url)
    revoked.revoke_device("mallory")
    tokens["revoked"] = tokens.pop("mallory")
    keys = Tokens(pipeline.runtime.redis)
    read_key = keys.create_api_key("read", "matrix")[1]
    old_id, old_admin = keys.create_api_key("admin", "gone")
    keys.revoke_api_key(old_id)
    return {"first": first, "second": second, "tokens": tokens, "read": read_key, "revoked_admin": old_admin}


def _client(pipeline, fleet, device: str) -> DeviceClient:
    fed = fleet["second"] if device == "carol" else fleet["first"]
    return DeviceClient(fleet["tokens"][device], fed, pipeline.api_url)


def _upload_url(client: DeviceClient, fed: str, plan: dict, blob: bytes, size: int | None = None) -> dict:
    return client.client.post(f"/api/v1/federations/{fed}/upload-url", {
        "round": plan["round"], "sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob) if size is None else size})


def test_a_presigned_put_writes_only_its_own_key_and_only_once(pipeline, fleet):
    alice = _client(pipeline, fleet, "alice")
    plan = alice.check_in(**PHONE)
    assert "url" not in plan["upload"]  # no URL before the device declares its bytes: a store bounds only signed sizes
    spec = pipeline.runtime.state.federations.config(fleet["first"]).spec.tensors
    blob = encode_update(random_deltas(spec, np.random.default_rng(0), 0.01))
    signed = _upload_url(alice, fleet["first"], plan, blob)
    url, headers = signed["url"], signed["headers"]
    with httpx.Client(timeout=30) as http:
        other = url.replace("/alice.safetensors", "/bob.safetensors")
        assert http.put(other, content=blob, headers=headers).status_code == 403  # the signature names one key
        versions = re.sub(r"/updates/[^?]+", f"/federations/{fleet['first']}/versions/000001/adapter_model.safetensors", url)
        assert http.put(versions, content=blob, headers=headers).status_code == 403
        assert http.put(url, content=blob, headers={k: v for k, v in headers.items() if k != "If-None-Match"}
                        ).status_code == 403  # dropping the signed If-None-Match
        assert http.put(url, content=blob, headers=headers).status_code == 200
        assert http.put(url, content=blob, headers=headers).status_code == 412  # write-once
    assert pipeline.runtime.store.get(signed["key"]) == blob == pipeline.runtime.store.get(plan["upload"]["key"])


def test_the_store_itself_refuses_a_body_of_another_size_than_the_signed_one(pipeline, fleet):
    bob = _client(pipeline, fleet, "bob")
    plan = bob.check_in(**PHONE)
    limit = pipeline.settings.max_update_bytes
    oversize = bob.client.http.post(f"/api/v1/federations/{fleet['first']}/upload-url", json={
        "round": plan["round"], "sha256": "0" * 64, "size": limit + 1})
    assert (oversize.status_code, oversize.json()["code"]) == (413, "object_too_large")
    blob = b"\0" * 1000
    understated = _upload_url(bob, fleet["first"], plan, blob, size=100)  # declares 100, sends 1000
    overstated = _upload_url(bob, fleet["first"], plan, blob[:100], size=1000)
    with httpx.Client(timeout=30) as http:
        for signed, body in ((understated, blob), (overstated, blob[:100])):
            sent = {k: v for k, v in signed["headers"].items() if k != "Content-Length"}  # the true length goes out
            assert http.put(signed["url"], content=body, headers=sent).status_code == 403  # S3: the signed length
    assert not pipeline.runtime.store.exists(understated["key"])


def test_a_sha256_bound_url_refuses_other_bytes(pipeline, fleet):
    bob = _client(pipeline, fleet, "bob")
    plan = bob.check_in(**PHONE)
    spec = pipeline.runtime.state.federations.config(fleet["first"]).spec.tensors
    blob = encode_update(random_deltas(spec, np.random.default_rng(1), 0.01))
    signed = bob.client.post(f"/api/v1/federations/{fleet['first']}/upload-url",
                             {"round": plan["round"], "sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)})
    with httpx.Client(timeout=30) as http:
        tampered = http.put(signed["url"], content=blob[:-4] + b"\0\0\0\0", headers=signed["headers"])
        assert tampered.status_code in (400, 403)
        assert not pipeline.runtime.store.exists(signed["key"])
        assert http.put(signed["url"], content=blob, headers=signed["headers"]).status_code == 200


def test_a_device_cannot_read_another_devices_update_or_act_as_it(pipeline, fleet):
    alice, carol = _client(pipeline, fleet, "alice"), _client(pipeline, fleet, "carol")
    plan = alice.check_in(**PHONE)
    get = plan["download"]["adapter_model.safetensors"]["url"]
    bob_update = f"updates/{fleet['first']}/{plan['round']:06d}/bob.safetensors"
    parsed = urllib.parse.urlsplit(get)
    forged = urllib.parse.urlunsplit(parsed._replace(path=f"{parsed.path.rsplit('/federations/', 1)[0]}/{bob_update}"))
    with httpx.Client(timeout=30) as http:
        assert http.get(get).status_code == 200  # its own download works
        assert http.get(forged).status_code == 403  # the same signature on bob's key does not
    # the device id comes from the token: a body cannot name another device, and another federation is closed
    sneaky = httpx.post(f"{pipeline.api_url}/api/v1/federations/{fleet['first']}/updates",
                        headers={"Authorization": f"Bearer {fleet['tokens']['alice']}"},
                        json={"round": plan["round"], "sha256": "0" * 64, "num_samples": 5, "base_version": 0,
                              "device": "bob"})
    assert sneaky.status_code == 422 and "device" in sneaky.json()["detail"]
    cross = httpx.post(f"{pipeline.api_url}/api/v1/federations/{fleet['first']}/check-in",
                       headers={"Authorization": f"Bearer {fleet['tokens']['carol']}"}, json=PHONE)
    assert cross.status_code == 403
    assert carol.federation == fleet["second"]


def test_devices_get_no_operator_data(pipeline, fleet):
    with httpx.Client(base_url=pipeline.api_url, headers={"Authorization": f"Bearer {fleet['tokens']['alice']}"},
                      timeout=30) as http:
        for path in (f"/api/v1/federations/{fleet['first']}", f"/api/v1/federations/{fleet['first']}/devices",
                     f"/api/v1/federations/{fleet['first']}/rounds/1", "/api/v1/deadletters", "/api/v1/models"):
            response = http.get(path)
            assert response.status_code == 403, path
            assert response.headers["content-type"] == "application/problem+json"


# --- the auth matrix: every route x every kind of caller ---------------------------------------------

PUBLIC = {"/healthz"}


def _routes(pipeline) -> list[tuple[str, str, dict]]:
    spec = httpx.get(f"{pipeline.api_url}/openapi.json").json()
    return [(method.upper(), path, op) for path, ops in spec["paths"].items() for method, op in ops.items()]


def _audience(method: str, path: str) -> str:
    if path in PUBLIC:
        return "public"
    if re.search(r"/(check-in|upload-url|updates|receipts|reports|split/|identity|secagg/)", path):
        return "device"
    if method == "GET" and path != "/api/v1/keys":
        return "read"
    return "admin"


def test_every_route_answers_each_caller_as_its_scope_says(pipeline, fleet):
    callers = {
        "none": None, "bad": "ftk_0123456789abcdef_not-a-real-secret", "admin": pipeline.admin_key,
        "read": fleet["read"], "device-here": fleet["tokens"]["alice"], "device-other": fleet["tokens"]["carol"],
        "revoked-device": fleet["tokens"]["revoked"], "revoked-admin": fleet["revoked_admin"],
    }
    allowed = {"public": set(callers), "read": {"admin", "read"}, "admin": {"admin"}, "device": {"device-here"}}
    checked = 0
    with httpx.Client(base_url=pipeline.api_url, timeout=30) as http:
        for method, template, _ in _routes(pipeline):
            # nothing here may destroy the fixture: deletions name things that do not exist
            fed = "tb-absent" if method == "DELETE" and template.endswith("{name}") else fleet["first"]
            path = (template.replace("{name}", fed).replace("{round_no}", "1").replace("{version}", "1")
                    .replace("{device_id}", "nobody").replace("{group}", "nogroup").replace("{key_id}", "nokey")
                    .replace("{session_id}", "ts-000000000000").replace("{model_id}", "nomodel")
                    .replace("{receipt}", "0" * 64).replace("{rollout_id}", "ro-0000000000")
                    .replace("{action}", "step").replace("{stage}", "advertise"))
            audience = _audience(method, template)
            for caller, token in callers.items():
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                response = http.request(method, path, headers=headers, json={} if method in ("POST", "PUT") else None)
                expect_ok = caller in allowed[audience]
                if expect_ok:
                    assert response.status_code not in (401, 403), (method, path, caller, response.text)
                    unavailable = response.status_code == 503 and "split_unavailable" in response.text
                    assert response.status_code < 500 or unavailable, (method, path, caller, response.text)
                elif caller in ("none", "bad", "revoked-device", "revoked-admin"):
                    assert response.status_code == 401, (method, path, caller, response.status_code)
                    assert response.headers.get("www-authenticate") == "Bearer"
                else:
                    assert response.status_code == 403, (method, path, caller, response.status_code)
                checked += 1
    assert checked >= 28 * len(callers)
