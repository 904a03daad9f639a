"""The OpenAPI types every JSON success response, and typing a response changes nothing a client sees."""

from __future__ import annotations

import fakeredis
import pytest
from fastapi.testclient import TestClient

from fleettune.shared.control.auth import Tokens
from fleettune.shared.runtime import Runtime
from fleettune.shared.settings import Settings
from fleettune.shared.storage import LocalObjectStore
from fleettune.workers.api import create_app


@pytest.fixture
def app(tmp_path):
    return create_app(Runtime(Settings(), fakeredis.FakeRedis(), LocalObjectStore(tmp_path)), lambda raw, at: None)


def test_every_2xx_json_response_has_a_typed_schema(app):
    spec = app.openapi()
    components = spec["components"]["schemas"]
    untyped, checked = [], 0
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                schema = response.get("content", {}).get("application/json", {}).get("schema")
                if not status.startswith("2") or schema is None:
                    continue
                checked += 1
                ref = schema.get("$ref", "")
                target = components.get(ref.removeprefix("#/components/schemas/"), {}) if ref else schema
                if not target.get("properties"):
                    untyped.append(f"{method.upper()} {path} {status}")
    assert not untyped, untyped
    assert checked >= 50  # every JSON route of the API, not a vacuous pass


def test_the_hot_submit_path_and_the_split_step_are_documented(app):
    paths = app.openapi()["paths"]
    submit = paths["/api/v1/federations/{name}/updates"]["post"]["responses"]["202"]["content"]["application/json"]
    assert submit["schema"] == {"$ref": "#/components/schemas/SubmitReceipt"}
    step = paths["/api/v1/federations/{name}/split/{action}"]["post"]["responses"]["200"]["content"]
    assert list(step) == ["application/vnd.safetensors"]


def test_typed_answers_keep_exactly_the_members_the_route_built(app):
    """A check-in's two shapes: optional members stay absent (no nulls added), present nulls stay."""
    r = app.state.services.runtime.redis
    admin = {"Authorization": f"Bearer {Tokens(r).create_api_key('admin')[1]}"}
    client = TestClient(app)
    created = client.put("/api/v1/federations/f/adapter", headers=admin, json={"type": "lora", "rank": 4})
    assert created.status_code == 201
    token = client.post("/api/v1/federations/f/devices", headers=admin, json={"device_id": "d"}).json()["token"]
    tiers = {"small": {"mode": "infer", "adapter": "none", "base_model": "tiny"},
             "*": {"mode": "api", "api_url": "https://llm.example"}}
    assert client.put("/api/v1/federations/f/deployment", headers=admin, json={"tiers": tiers}).status_code == 200
    device = {"Authorization": f"Bearer {token}"}

    infer = client.post("/api/v1/federations/f/check-in", headers=device, json={"tier": "small"}).json()
    assert infer == {"federation": "f", "device": "d", "action": "infer", "tier": "small", "groups": [],
                     "serve": {"mode": "infer", "version": 0, "previous": 0, "rollout": None, "arm": None,
                               "base_download": None, "base_model": "tiny", "adapter": None}}
    api = client.post("/api/v1/federations/f/check-in", headers=device, json={"tier": "other"}).json()
    assert api["serve"] == {"mode": "api", "version": 0, "previous": 0, "rollout": None, "arm": None,
                            "api_url": "https://llm.example", "adapter": None}

    devices = client.get("/api/v1/federations/f/devices", headers=admin).json()["devices"]
    assert devices[0]["device"] == "d" and devices[0]["tier"] == "other" and devices[0]["os"] is None
