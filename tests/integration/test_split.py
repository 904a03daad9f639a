"""Split learning through real processes: device clients, `fleettune api`, `fleettune split-server`,
the Celery workers' round pipeline (SplitFed averaging of the devices' parts), Redis and S3.

Both modes train the tiny model on legal text; the whole model (the devices' averaged part from the
federation's version, the server's part from its own version) ends below the base's held-out
perplexity. Malformed messages are refused by name and counted, and the split server stays up.
"""

from __future__ import annotations

import json
import math

import httpx
import numpy as np
import pytest
import torch

from fleettune import DeviceClient, Federation, FleettuneAPIError
from fleettune.shared import corpora, keys
from fleettune.shared.protocol import versions
from fleettune.shared.protocol.adapter_spec import AdapterConfig, build_spec
from fleettune.shared.device import models, trainer
from fleettune.shared.split import model as split_model
from fleettune.shared.split import parts, wire
from fleettune.shared.split.config import SplitConfig
from fleettune.shared.split.device import HttpTransport, SplitDevice, combined, split_round
from fleettune.workers.local import services

pytestmark = pytest.mark.services
ADAPTER = {"type": "lora", "rank": 4, "alpha": 8}
STEPS = 30


@pytest.fixture(scope="module")
def gateway(env, workdir, workers):
    """A split server and an API that forwards to it, on the session's Redis, S3 and workers."""
    split = services.Api(env, workdir, command="split-server")
    api = services.Api(dict(env, FLEETTUNE_SPLIT_URL=split.url), workdir)
    yield api, split
    api.stop()
    split.stop()


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(2)
    tokenizer = models.load_tokenizer("tiny")
    train = trainer.blocks(tokenizer(corpora.train_text("legal", 80_000))["input_ids"], 64)
    heldout = trainer.blocks(tokenizer(corpora.heldout_text("legal", 12_000))["input_ids"], 64)
    return tokenizer, train, heldout


def _federation(pipeline, api_url: str, name: str, mode: str, returns: str = "residual") -> Federation:
    admin = Federation(pipeline.admin_key, name, api_url)
    admin.create(model="tiny-llama", adapter=ADAPTER)
    admin.client.put(f"/api/v1/federations/{name}/split",
                     {"mode": mode, "cut": 1, "top_layers": 1, "clip": 1000.0, "sigma": 0.0, "seq_len": 64,
                      "max_batch": 16, "server_lr": 3e-3, "publish_every": 20, "server_returns": returns})
    admin.train(model="tiny-llama", rounds=1, min_updates=2,
                round_config={"timeout_seconds": 600, "max_update_norm": 100.0})
    return admin


@pytest.mark.parametrize("mode,returns", [("two_part", "residual"), ("u_shaped", "residual"),
                                          ("u_shaped", "correction")])
def test_both_modes_train_through_the_gateway_and_the_split_server(pipeline, gateway, tiny, mode, returns):
    api, _ = gateway
    name = f"split-{mode.replace('_', '-')}-{returns}-{np.random.default_rng().integers(1e9)}"
    admin = _federation(pipeline, api.url, name, mode, returns)
    config = SplitConfig(**admin.client.get(f"/api/v1/federations/{name}/split")["config"])
    assert config.server_returns == returns
    adapter = AdapterConfig(rank=4, alpha=8)
    shapes = build_spec(pipeline.runtime.state.federations.config(name).model, adapter).tensors
    tokenizer, train, heldout = tiny
    clients = [DeviceClient(admin.register_device(f"phone-{i}"), name, api.url) for i in range(2)]
    plans = [client.check_in() for client in clients]  # both join the round before either sends
    for i, (client, plan) in enumerate(zip(clients, plans)):
        model = trainer.peft_model(models.load_model("tiny"), adapter)
        device = SplitDevice(HttpTransport(client, model.config.hidden_size), model, train[i::2], config, lr=3e-3,
                             seed=i, batch=8)
        receipt = split_round(client, device, STEPS, shapes, plan)
        assert client.wait_outcome(receipt["receipt"])["status"] == "accepted"
        assert device.transport.sent > 0 and math.isinf(device.epsilon())
    status = admin.client.get(f"/api/v1/federations/{name}/split")
    assert status["server_steps"] >= 2 * STEPS * 0.9 and status["server_part_version"] >= 2
    assert set(status["devices"]) == {"phone-0", "phone-1"}
    round_1 = pipeline.wait_round(pipeline.runtime.state.federations.config(name), 1, timeout=120)
    assert round_1.status == "closed"

    # the whole model: the devices' averaged part (version 1) and the server's own newest part
    store, r = pipeline.runtime.store, pipeline.runtime.redis
    device_part = versions.load_weights(store, name, 1, build_spec(pipeline.runtime.state.federations.config(name).model,
                                                                   adapter), 1 << 30, 1 << 20)
    server_layers = config.server_layers(4)
    server_shapes = {k: v for k, v in shapes.items() if split_model.layer_of(k) in server_layers}
    version, server_part, _ = parts.load(r, store, name, server_shapes)
    manifest = json.loads(store.get(f"{keys.split_prefix(name, version)}/{versions.MANIFEST_FILE}"))
    assert manifest["layers"] == list(server_layers) and version == status["server_part_version"]
    model = trainer.peft_model(models.load_model("tiny"), adapter)
    base_ppl = trainer.perplexity(model, heldout)  # B = 0: the base model itself
    trainer.load_adapter_weights(model, combined(device_part, server_part))
    assert trainer.perplexity(model, heldout) < 0.9 * base_ppl


def test_malformed_and_oversized_messages_are_refused_by_name_and_the_server_stays_up(pipeline, gateway):
    api, split = gateway
    name = f"split-bad-{np.random.default_rng().integers(1e9)}"
    admin = _federation(pipeline, api.url, name, "two_part")
    with pytest.raises(FleettuneAPIError) as refused:  # a two-part server holds the head: nothing to correct
        admin.client.put(f"/api/v1/federations/{name}/split", {"mode": "two_part", "server_returns": "correction"})
    assert refused.value.code == "invalid_config" and "U-shaped" in refused.value.detail
    token = admin.register_device("mallory")
    http = httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    path = f"/api/v1/federations/{name}/split/step"
    good = {"activations": torch.zeros(2, 64, 128), "labels": torch.zeros(2, 64, dtype=torch.long)}
    cases = [
        (b"\x00\x01garbage", {"batch": 2}, 422, "header_too_large"),
        (b"\x00" * 3, {"batch": 2}, 422, "truncated"),
        (wire.encode(dict(good, activations=torch.zeros(2, 64, 64))), {"batch": 2}, 422, "bad_shape"),
        (wire.encode(dict(good, activations=torch.full((2, 64, 128), math.inf))), {"batch": 2}, 422, "non_finite"),
        (wire.encode(dict(good, labels=torch.full((2, 64), 10**6, dtype=torch.long))), {"batch": 2}, 422,
         "bad_label"),
        (wire.encode(dict(good, activations=torch.full((2, 64, 128), 100.0))), {"batch": 2}, 422,
         "norm_above_bound"),  # never clipped: norm 9,051 against a clip of 1,000 and no noise
        (wire.encode(good), {"batch": 17}, 413, "batch_too_large"),  # past the config's max_batch
        (b"\x00" * (wire.max_bytes(16, 64, 128) + 1), {"batch": 2}, 413, "too_large"),
    ]
    for body, params, status, code in cases:
        response = http.post(path, content=body, params=params)
        assert (response.status_code, response.json()["code"]) == (status, code), response.text
    response = http.post(f"/api/v1/federations/{name}/split/backward", content=wire.encode({"grad": torch.zeros(1)}),
                         params={"step": "0" * 16})
    assert (response.status_code, response.json()["code"]) == (409, "unknown_step")
    unauthenticated = httpx.post(f"{split.url}/internal/{name}/step", content=wire.encode(good), params={"batch": 2},
                                 headers={"x-fleettune-device": "mallory", "x-fleettune-secret": "guess"})
    assert unauthenticated.status_code == 401  # the split server answers only the gateway
    assert httpx.get(f"{split.url}/healthz").status_code == 200
    answer = http.post(path, content=wire.encode(good), params={"batch": 2})  # a good step still works
    assert answer.status_code == 200 and float(answer.headers["x-loss"]) > 0
    rejected = admin.client.get(f"/api/v1/federations/{name}/split")["rejected"]
    assert rejected == {"header_too_large": 1, "truncated": 1, "bad_shape": 1, "non_finite": 1, "bad_label": 1,
                        "norm_above_bound": 1}


def test_a_device_past_its_epsilon_budget_is_refused_and_the_accountant_reports_it(pipeline, gateway):
    api, _ = gateway
    name = f"split-budget-{np.random.default_rng().integers(1e9)}"
    admin = _federation(pipeline, api.url, name, "two_part")
    probe = SplitConfig(mode="two_part", clip=1000.0, sigma=1.0, sample_rate=0.5, max_epsilon=1.0, seq_len=64)
    budget = (probe.epsilon(2) + probe.epsilon(3)) / 2  # two steps fit, the third would pass it
    admin.client.put(f"/api/v1/federations/{name}/split",
                     {"mode": "two_part", "cut": 1, "clip": 1000.0, "sigma": 1.0, "sample_rate": 0.5,
                      "max_epsilon": budget, "seq_len": 64, "max_batch": 16, "bottleneck": 16})
    http = httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {admin.register_device('alice')}"},
                        timeout=30)
    step = {"activations": torch.zeros(2, 64, 16), "labels": torch.zeros(2, 64, dtype=torch.long)}
    answers = [http.post(f"/api/v1/federations/{name}/split/step", content=wire.encode(step), params={"batch": 2})
               for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 403], answers[-1].text
    assert answers[2].json()["code"] == "privacy_budget_exhausted"
    status = admin.client.get(f"/api/v1/federations/{name}/split")
    assert status["devices"] == {"alice": {"steps": 2}} and status["rejected"] == {"privacy_budget_exhausted": 1}
    assert f"epsilon {probe.epsilon(2):.3g} after 2 steps" in status["privacy"]
