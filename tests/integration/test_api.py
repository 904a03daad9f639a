"""The control plane as its users meet it: `fleettune api` under uvicorn, with real Redis, S3 and workers.

The spec's curl calls sent as written, the SDK, a session driven only through the API and the
gateway against a numpy reference, and an API restart in the middle of a session.
"""

from __future__ import annotations

import hashlib
import itertools
import tarfile
import time

import httpx
import numpy as np
import pytest
from safetensors.numpy import load

from fleettune import DeviceClient, Federation, FleettuneAPIError, ModelRegistry
from fleettune.shared.protocol.adapter_spec import LAYOUTS, AdapterConfig, build_spec
from fleettune.shared.device.models import TINY
from fleettune.shared.protocol.updates import encode_update
from fleettune.workers.local import services
from tests.reference import mean_delta, median_claim, next_global, random_deltas, server_optimizer

pytestmark = pytest.mark.services
_names = itertools.count(1)

# The product spec's payloads, verbatim.
ADAPTER = {"type": "lora", "rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "k_proj", "o_proj"],
           "dropout": 0.05}
STRATEGY = {"algorithm": "fedavg", "learning_rate": 1e-4, "local_epochs": 3, "max_grad_norm": 1.0,
            "weight_decay": 0.01, "round_config": {"timeout_seconds": 900, "min_samples_per_client": 50},
            "device_filter": {"min_ram_mb": 6144, "min_storage_mb": 2048}}
SESSION = {"model_id": "meta-llama/Llama-3.2-1B", "strategy": "fedavg", "adapter_config": ADAPTER,
           "strategy_params": {"learning_rate": 1e-4, "local_epochs": 3, "max_grad_norm": 1.0},
           "round_config": {"min_clients": 10, "max_rounds": 100, "timeout_seconds": 900},
           "device_filter": {"min_ram_mb": 6144, "min_storage_mb": 2048}}
PHONE = {"ram_mb": 8192, "storage_mb": 4096}


def _name(prefix: str) -> str:
    return f"{prefix}-{next(_names)}-{int(time.time() * 1000) % 10**7}"


def _http(pipeline) -> httpx.Client:
    return httpx.Client(base_url=pipeline.api_url, headers={"Authorization": f"Bearer {pipeline.admin_key}"},
                        timeout=30)


def _wait_round(federation: Federation, round_no: int, timeout: float = 60) -> dict:
    end = time.monotonic() + timeout
    while (body := federation.round(round_no))["status"] not in ("closed", "failed"):
        assert time.monotonic() < end, f"round {round_no} still {body['status']}"
        time.sleep(0.05)
    return body


def _devices(pipeline, fed: str, count: int) -> dict[str, DeviceClient]:
    federation = Federation(pipeline.admin_key, fed, pipeline.api_url)
    return {f"phone-{i}": DeviceClient(federation.register_device(f"phone-{i}", **PHONE), fed, pipeline.api_url)
            for i in range(count)}


def test_the_specs_three_calls_as_written_succeed_and_take_effect(pipeline):
    fed = _name("spec")
    with _http(pipeline) as http:
        adapter = http.put(f"/api/v1/federations/{fed}/adapter", json=ADAPTER)
        assert adapter.status_code == 201, adapter.text  # PUT on a new name creates the federation
        strategy = http.put(f"/api/v1/federations/{fed}/strategy", json=STRATEGY)
        assert strategy.status_code == 200, strategy.text
        session = http.post("/api/v1/training-sessions", json=SESSION)
        assert session.status_code == 201, session.text
        body = session.json()
        assert body["status"] == "pending" and body["last_round"] == 100  # a worker publishes v0, opens round 1
        end = time.monotonic() + 60
        while (now := http.get(f"/api/v1/training-sessions/{body['id']}").json())["status"] == "pending":
            assert time.monotonic() < end, "no worker opened the session's first round"
            time.sleep(0.05)
        assert now["status"] == "active" and now["current_round"] == 1 and now["version"] == 0
        config = http.get(f"/api/v1/federations/{body['federation']}").json()["config"]
    assert config["adapter"] == dict(ADAPTER, num_virtual_tokens=16, target_modules=ADAPTER["target_modules"],
                                     tier_ranks={})
    assert config["training"]["learning_rate"] == 1e-4 and config["training"]["local_epochs"] == 3
    assert config["policy"]["min_updates"] == 10 and config["policy"]["timeout_seconds"] == 900
    assert config["device_filter"]["min_ram_mb"] == 6144
    strategy_fed = Federation(pipeline.admin_key, fed, pipeline.api_url).get()["config"]
    assert strategy_fed["training"]["weight_decay"] == 0.01 and strategy_fed["policy"]["min_samples_per_client"] == 50


def test_a_rank_change_applies_from_the_next_round_and_the_round_judges_by_its_own(pipeline):
    fed = _name("rank")
    federation = Federation(pipeline.admin_key, fed, pipeline.api_url)
    federation.create(model="tiny-llama")
    federation.configure_adapter(**dict(ADAPTER, rank=4))
    devices = _devices(pipeline, fed, 2)
    federation.train(model="tiny-llama", rounds=2, min_updates=2)

    changed = federation.configure_adapter(**dict(ADAPTER, rank=8))  # during round 1
    assert changed["applies_from_round"] == 2 and changed["applied"] == "when the next round opens"
    rng = np.random.default_rng(0)
    rank4 = _layout(rank=4)
    outcomes = []
    for device in devices.values():
        plan = device.check_in(**PHONE)
        assert plan["adapter"]["rank"] == 4
        outcomes.append(device.wait_outcome(device.send(plan, encode_update(random_deltas(rank4, rng, 0.01)),
                                                        num_samples=20)["receipt"]))
    assert [o["status"] for o in outcomes] == ["accepted", "accepted"]
    assert _wait_round(federation, 1)["status"] == "closed"

    plan = devices["phone-0"].check_in(**PHONE)
    assert plan["round"] == 2 and plan["adapter"]["rank"] == 8 and plan["base_version"] == 2  # v2: re-initialised
    wrong = devices["phone-0"].send(plan, encode_update(random_deltas(rank4, rng, 0.01)), num_samples=20)
    outcome = devices["phone-0"].wait_outcome(wrong["receipt"])
    assert (outcome["status"], outcome["reason"], outcome["round"]) == ("rejected", "bad_shape", 2)
    plan = devices["phone-1"].check_in(**PHONE)
    right = devices["phone-1"].send(plan, encode_update(random_deltas(_layout(rank=8), rng, 0.01)), num_samples=20)
    assert devices["phone-1"].wait_outcome(right["receipt"])["status"] == "accepted"


def test_a_session_driven_only_through_the_api_matches_the_numpy_reference(pipeline):
    fed = _name("ref")
    federation = Federation(pipeline.admin_key, fed, pipeline.api_url)
    federation.create(model="tiny-llama", adapter=ADAPTER, strategy={
        "algorithm": "fedavg", "round_config": {"max_update_norm": 0.5, "server_lr": 0.7, "max_num_samples": 300}})
    devices = _devices(pipeline, fed, 5)
    session = federation.train(model="tiny-llama", rounds=2, min_updates=5)
    spec = pipeline.runtime.state.federations.config(fed).spec.tensors
    rng = np.random.default_rng(7)
    prev, reference_claim = None, None
    for round_no in (1, 2):
        deltas, samples = [], []
        for i, device in enumerate(devices.values()):
            plan = device.check_in(**PHONE)
            weights = load(device.download(plan))  # the version this round trains from, by presigned GET
            if prev is not None:
                assert max(float(np.abs(weights[k] - prev[k]).max()) for k in prev) <= 1e-6
            prev = weights
            deltas.append(random_deltas(spec, rng, 0.004 * (i + 1)))
            samples.append(int(rng.integers(10, 500)))
            device.send(plan, encode_update(deltas[-1]), num_samples=samples[-1])
        assert _wait_round(federation, round_no)["contributors"] == sorted(devices)
        prev = next_global(prev, deltas, samples, 0.5, 300, 0.7, reference_claim=reference_claim)
        reference_claim = median_claim(samples, 300)  # round 2's weight cap derives from round 1's claims
    published = load(pipeline.runtime.store.get(f"federations/{fed}/versions/000002/adapter_model.safetensors"))
    assert max(float(np.abs(published[k] - prev[k]).max()) for k in prev) <= 1e-6
    assert session.wait(timeout=30)["status"] == "completed"
    assert [v["version"] for v in federation.versions()] == [0, 1, 2]
    page = federation.client.get(f"/api/v1/federations/{fed}/versions", params={"limit": 2})
    assert ([v["version"] for v in page["versions"]], page["next_before"]) == ([1, 2], 1)  # the newest two
    older = federation.client.get(f"/api/v1/federations/{fed}/versions", params={"limit": 2, "before": 1})
    assert ([v["version"] for v in older["versions"]], older["next_before"]) == ([0], None)


def test_fedadam_chosen_through_the_api_publishes_what_the_paper_computes(pipeline):
    """The strategy PUT selects FedAdam; two rounds on real workers (whichever process closes each
    round reads the optimizer state the last one stored) equal Reddi et al.'s update in numpy."""
    fed = _name("adam")
    federation = Federation(pipeline.admin_key, fed, pipeline.api_url)
    federation.create(model="tiny-llama", adapter=ADAPTER)
    answer = federation.configure_strategy("fedadam", round_config={"max_update_norm": 0.5})
    assert answer["config"]["aggregation"]["optimizer"] == "adam" and answer["config"]["policy"]["server_lr"] == 0.01
    devices = _devices(pipeline, fed, 3)
    federation.train(model="tiny-llama", algorithm="fedadam", rounds=2, min_updates=3)
    spec = pipeline.runtime.state.federations.config(fed).spec.tensors
    rng = np.random.default_rng(11)
    x0, means = None, []
    for round_no in (1, 2):
        deltas = []
        for i, device in enumerate(devices.values()):
            plan = device.check_in(**PHONE)
            if x0 is None:
                x0 = {k: v.astype(np.float64) for k, v in load(device.download(plan)).items()}
            deltas.append(random_deltas(spec, rng, 0.003 * (i + 1)))
            device.send(plan, encode_update(deltas[-1]), num_samples=100)
        assert _wait_round(federation, round_no)["status"] == "closed"
        means.append(mean_delta(deltas, [100] * 3, 0.5))
    published = load(pipeline.runtime.store.get(f"federations/{fed}/versions/000002/adapter_model.safetensors"))
    for k in spec:
        expected = server_optimizer("adam", x0[k], [m[k] for m in means], 0.01)
        np.testing.assert_allclose(published[k], expected, atol=1e-6, rtol=1e-5)


def test_the_sdk_trains_and_uploads_registry_versions_single_and_multipart(pipeline, env, workdir, tmp_path):
    fed = _name("sdk")
    session = Federation(api_key=pipeline.admin_key, name=fed, base_url=pipeline.api_url).train(
        model="tiny-llama", algorithm="fedavg", rounds=100, min_updates=10)
    assert session.status == "active" and session.federation == fed
    assert session.stop()["status"] == "stopped"

    small, large = tmp_path / "adapter.safetensors", tmp_path / "base.tar"
    small.write_bytes(np.random.default_rng(1).bytes(300_000))
    padding = tmp_path / "README.bin"  # a real model directory, padded past the part size: three parts
    padding.write_bytes(np.random.default_rng(2).bytes(12 * 1024 * 1024))
    with tarfile.open(large, "w") as tar:
        for file in [*sorted(TINY.iterdir()), padding]:
            tar.add(file, arcname=f"tiny/{file.name}")
    parts_api = services.Api(dict(env, FLEETTUNE_MULTIPART_THRESHOLD=str(1024 * 1024)), workdir)
    try:
        registry = ModelRegistry(api_key=pipeline.admin_key, base_url=parts_api.url)
        one = registry.upload_version_from_path("notes-adapter", small, "1.0.0", ["safetensors"], kind="adapter",
                                                progress=False)
        many = registry.upload_version_from_path("tiny-base", large, "2026.11", ["safetensors"], progress=False)
        assert (one["status"], one["size"]) == ("ready", 300_000) and many["status"] == "ready"
        with pytest.raises(FleettuneAPIError) as again:
            registry.upload_version_from_path("notes-adapter", large, "1.0.0", progress=False)
        assert again.value.status == 409 and again.value.code == "version_exists"  # versions are immutable
        registry.set_current("tiny-base", "2026.11")
        assert registry.get("tiny-base")["current_version"] == "2026.11"
        assert registry.download("tiny-base", "2026.11", tmp_path / "copy.bin").read_bytes() == large.read_bytes()
    finally:
        parts_api.stop()


def test_an_api_restart_in_the_middle_of_a_session_loses_nothing(pipeline, env, workdir):
    own = services.Api(env, workdir)
    try:
        fed = _name("restart")
        federation = Federation(pipeline.admin_key, fed, own.url)
        federation.create(model="tiny-llama", adapter=ADAPTER)
        tokens = {f"phone-{i}": federation.register_device(f"phone-{i}", **PHONE) for i in range(4)}
        federation.train(model="tiny-llama", rounds=1, min_updates=4)
        spec = pipeline.runtime.state.federations.config(fed).spec.tensors
        rng = np.random.default_rng(3)
        receipts = {}
        for i, (device, token) in enumerate(tokens.items()):
            if i == 2:
                own.kill()  # SIGKILL: no graceful shutdown
                own.start()
                # a device that never saw its answer posts again: the ledger in Redis gives the same receipt
                again = DeviceClient(tokens["phone-0"], fed, own.url)
                repeat = again.submit(again.check_in(**PHONE), receipts["phone-0"]["sha256"], 10)
                assert (repeat["receipt"], repeat["duplicate"]) == (receipts["phone-0"]["receipt"], True)
            client = DeviceClient(token, fed, own.url)  # tokens, sessions and plans live in Redis
            plan = client.check_in(**PHONE)
            blob = encode_update(random_deltas(spec, rng, 0.01))
            receipts[device] = dict(client.send(plan, blob, num_samples=10), sha256=hashlib.sha256(blob).hexdigest())
        assert _wait_round(federation, 1)["contributors"] == sorted(tokens)
        assert pipeline.runtime.state.federations.stats(fed) == {"received": 4, "accepted": 4}
    finally:
        own.stop()


def _layout(rank: int) -> dict[str, tuple[int, ...]]:
    adapter = AdapterConfig(rank=rank, alpha=16, target_modules=tuple(ADAPTER["target_modules"]))
    return build_spec(LAYOUTS["tiny-llama"], adapter).tensors


def test_a_submission_received_after_the_deadline_is_refused_as_late(pipeline):
    fed = _name("late")
    federation = Federation(pipeline.admin_key, fed, pipeline.api_url)
    federation.create(model="tiny-llama", strategy={"algorithm": "fedavg", "round_config": {"timeout_seconds": 3}})
    devices = _devices(pipeline, fed, 3)
    federation.train(model="tiny-llama", rounds=1, min_updates=2)
    spec = _layout(rank=8)
    plans = {name: device.check_in(**PHONE) for name, device in devices.items()}
    on_time = devices["phone-0"].send(plans["phone-0"], encode_update(random_deltas(spec, np.random.default_rng(0), 0.01)),
                                      num_samples=5)
    blob = encode_update(random_deltas(spec, np.random.default_rng(1), 0.01))
    sha256 = devices["phone-1"].upload(plans["phone-1"], blob)
    time.sleep(max(0.0, plans["phone-1"]["deadline"] - time.time()) + 0.3)
    with pytest.raises(FleettuneAPIError) as late:
        devices["phone-1"].submit(plans["phone-1"], sha256, num_samples=5)
    assert (late.value.status, late.value.code) == (409, "late")
    again = devices["phone-0"].submit(plans["phone-0"], _sha_of(pipeline, fed, "phone-0"), 5)
    assert (again["receipt"], again["duplicate"]) == (on_time["receipt"], True)  # on time, so still its receipt


def _sha_of(pipeline, fed: str, device: str) -> str:
    return hashlib.sha256(pipeline.runtime.store.get(f"updates/{fed}/000001/{device}.safetensors")).hexdigest()
