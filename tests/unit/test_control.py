"""The control plane's pure pieces on fakeredis: tokens, presigned local URLs, the gateway, sessions."""

from __future__ import annotations

import urllib.parse

import fakeredis
import pytest

from fleettune.shared import keys
from fleettune.shared.control.auth import Tokens
from fleettune.shared.control.gateway import Gateway
from fleettune.shared.control.groups import GroupSpec
from fleettune.shared.control.presign import LocalPresigner, S3Presigner, checksum_header
from fleettune.shared.control.schemas import (AggregationIn, LoraIn, RoundConfigIn, StrategyIn, StrategyParams,
                                    TrainingSessionIn, apply_strategy)
from fleettune.shared.control.plane import Control
from fleettune.shared.errors import Refusal
from fleettune.shared.federation import DeviceProfile
from fleettune.shared.pipeline.rounds import RoundCoordinator
from fleettune.shared.settings import Settings
from fleettune.shared.state import FederationState
from fleettune.shared.storage import LocalObjectStore


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_tokens_are_stored_only_as_digests_and_revocation_is_immediate():
    r = fakeredis.FakeRedis()
    tokens = Tokens(r)
    key_id, token = tokens.create_api_key("read", "dashboards")
    assert token.encode() not in b"".join(v for v in r.hgetall(keys.api_key(key_id)).values())
    assert tokens.authenticate(token).scope == "read"
    assert tokens.authenticate(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert tokens.authenticate("ftk_" + "0" * 16 + "_x") is None and tokens.authenticate("garbage") is None
    tokens.revoke_api_key(key_id)
    assert tokens.authenticate(token) is None


def test_a_new_device_token_replaces_the_old_one():
    tokens = Tokens(fakeredis.FakeRedis())
    first = tokens.create_device_token("fed", "phone")
    second = tokens.create_device_token("fed", "phone")
    assert tokens.authenticate(first) is None
    who = tokens.authenticate(second)
    assert (who.scope, who.federation, who.device) == ("device", "fed", "phone")
    assert tokens.revoke_device("fed", "phone") and tokens.authenticate(second) is None


def test_local_urls_refuse_tampering_and_expiry():
    clock = Clock()
    signer = LocalPresigner(b"k" * 32, clock)
    put = signer.put("updates/f/000001/a.safetensors", 2000.0, "http://api", sha256="ab" * 32, size=100)
    query = dict(p.split("=") for p in put.url.split("?")[1].split("&"))
    grant = signer.verify("PUT", "updates/f/000001/a.safetensors", query)
    assert grant.once and grant.sha256 == "ab" * 32 and grant.size == 100
    assert put.headers == {"If-None-Match": "*", "x-amz-checksum-sha256": checksum_header("ab" * 32),
                           "Content-Length": "100"}
    for method, key, changed in (("PUT", "updates/f/000001/b.safetensors", {}), ("GET", grant.key, {}),
                                 ("PUT", grant.key, {"once": "0"}), ("PUT", grant.key, {"sha256": "cd" * 32}),
                                 ("PUT", grant.key, {"size": "101"}), ("PUT", grant.key, {"size": ""}),
                                 ("PUT", grant.key, {"expires": "9999999999"})):
        with pytest.raises(Refusal) as refused:
            signer.verify(method, key, dict(query, **changed))
        assert refused.value.code == "bad_signature"
    clock.now = 2001.0
    with pytest.raises(Refusal, match="url_expired"):
        signer.verify("PUT", grant.key, query)


def test_s3_put_urls_sign_write_once_the_checksum_and_the_length():
    signer = S3Presigner("http://127.0.0.1:9", "key", "secret", "bucket", clock=Clock())
    put = signer.put("updates/f/000001/a.safetensors", 1600.0, "", sha256="00" * 32, size=7)
    signed = urllib.parse.parse_qs(urllib.parse.urlsplit(put.url).query)["X-Amz-SignedHeaders"][0].split(";")
    assert {"if-none-match", "x-amz-checksum-sha256", "content-length"} <= set(signed)
    assert put.headers["Content-Length"] == "7"
    assert "X-Amz-Expires=600" in put.url and put.headers["If-None-Match"] == "*"


@pytest.fixture
def plane(tmp_path):
    clock = Clock()
    state = FederationState(fakeredis.FakeRedis())
    store = LocalObjectStore(tmp_path)
    settings = Settings(device_rate_limit=5, rate_window_s=60)
    sent: list[tuple[bytes, float]] = []
    gateway = Gateway(state, LocalPresigner(b"k" * 32, clock), settings, lambda raw, at: sent.append((raw, at)), clock)
    control = Control(state, RoundCoordinator(state, store, settings, clock), clock)
    return state, gateway, control, sent, clock


def _session(control: Control, fed: str, mode: str = "sync", params: StrategyParams | None = None,
             **device_filter) -> dict:
    return control.create_session(TrainingSessionIn(
        model_id="tiny-llama", federation=fed, adapter_config=LoraIn(type="lora", rank=4),
        round_config=RoundConfigIn(min_clients=1, max_rounds=2, timeout_seconds=60, mode=mode),
        strategy_params=params, device_filter={"min_ram_mb": 1000, **device_filter}), "tests")


def test_a_session_opens_a_round_and_check_in_gives_the_device_its_own_urls(plane):
    state, gateway, control, _, _ = plane
    session = _session(control, "f")
    assert (session["status"], session["current_round"], session["last_round"]) == ("active", 1, 2)
    plan = gateway.check_in("f", DeviceProfile("a", ram_mb=2000), "http://api")
    assert plan["round"] == 1 and plan["adapter"]["rank"] == 4 and plan["action"] == "train"
    assert plan["upload"] == {"key": "updates/f/000001/a.safetensors", "url_from": "/api/v1/federations/f/upload-url"}
    signed = gateway.upload_url("f", "a", 1, "ab" * 32, 100, "http://api")
    assert signed["key"] == plan["upload"]["key"] and "/a.safetensors?" in signed["url"]
    assert plan["download"]["adapter_model.safetensors"]["url"].startswith("http://api/api/v1/objects/federations/f/")
    assert state.rounds.round_info("f", 1).cohort_size == 1  # it joined the open round
    with pytest.raises(Refusal) as refused:
        gateway.check_in("f", DeviceProfile("b", ram_mb=500), "http://api")
    assert (refused.value.status, refused.value.code) == (403, "ineligible") and "min_ram_mb 1000" in refused.value.detail


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_group_filters_admit_only_members(plane, mode):
    state, gateway, control, _, _ = plane
    _session(control, "g", mode, groups=["canary"])
    gateway.groups.put("g", "canary", GroupSpec(), ["in"])
    assert gateway.check_in("g", DeviceProfile("in", ram_mb=2000), "u")["round"] == 1
    with pytest.raises(Refusal, match="device groups"):
        gateway.check_in("g", DeviceProfile("out", ram_mb=2000), "u")


def test_an_up_to_date_async_device_still_learns_what_to_serve(plane):
    """The canary assignment comes before any round logic: the 409 up_to_date carries it."""
    state, gateway, control, _, _ = plane
    _session(control, "a", "async")
    plan = gateway.check_in("a", DeviceProfile("d", ram_mb=2000), "u")
    state.r.hset(keys.fed_async_bases("a"), "d", plan["base_version"])  # what ingest records on accept
    with pytest.raises(Refusal) as refused:
        gateway.check_in("a", DeviceProfile("d", ram_mb=2000), "u")
    assert (refused.value.status, refused.value.code) == (409, "up_to_date")
    assert refused.value.extra["serve"]["version"] == plan["serve"]["version"] == 0
    assert refused.value.extra["serve"]["arm"] == plan["serve"]["arm"]


def test_check_in_tells_devices_the_update_encoding(plane):
    _, gateway, control, _, _ = plane
    _session(control, "enc", params=StrategyParams(update_encoding="int8"))
    training = gateway.check_in("enc", DeviceProfile("a", ram_mb=2000), "u")["training"]
    assert (training["update_encoding"], training["update_density"]) == ("int8", 0.05)
    with pytest.raises(ValueError, match="update_encoding"):
        StrategyParams(update_encoding="zip")


def test_submit_records_then_enqueues_once_and_a_repeat_gets_the_same_receipt(plane):
    _, gateway, control, sent, clock = plane
    _session(control, "f")
    fields = {"round": 1, "sha256": "ab" * 32, "num_samples": 7, "base_version": 0, "train_seconds": 1.0,
              "metrics": {"loss": 2.0}}
    first = gateway.submit("f", "a", fields)
    clock.now += 5
    again = gateway.submit("f", "a", fields)
    assert (again.receipt, again.received_at, again.duplicate) == (first.receipt, first.received_at, True)
    assert len(sent) == 1 and sent[0][1] == 1000.0
    assert gateway.receipt("f", "a", first.receipt)["status"] == "pending"
    with pytest.raises(Refusal, match="unknown_receipt"):
        gateway.receipt("f", "b", first.receipt)  # another device cannot read it


def test_a_failed_enqueue_leaves_no_receipt_so_the_retry_goes_through(plane):
    state, gateway, control, sent, _ = plane
    _session(control, "f")
    fields = {"round": 1, "sha256": "ab" * 32, "num_samples": 7, "base_version": 0, "train_seconds": 0.0,
              "metrics": {}}
    gateway.enqueue = lambda raw, at: (_ for _ in ()).throw(ConnectionError("broker down"))
    with pytest.raises(ConnectionError):
        gateway.submit("f", "a", fields)
    gateway.enqueue = lambda raw, at: sent.append((raw, at))
    assert not gateway.submit("f", "a", fields).duplicate and len(sent) == 1


def test_devices_past_the_rate_limit_get_429_with_retry_after(plane):
    _, gateway, _, _, clock = plane
    for _ in range(5):
        gateway.throttle("token-a")
    with pytest.raises(Refusal) as limited:
        gateway.throttle("token-a")
    assert limited.value.status == 429 and int(limited.value.headers["Retry-After"]) > 0
    gateway.throttle("token-b")  # per token (one per device)
    gateway.throttle("token-a", bucket=":split")  # split steps have a window of their own
    clock.now += 60
    gateway.throttle("token-a")  # a new window


def test_strategy_payload_maps_onto_the_config(plane):
    _, _, control, _, _ = plane
    _session(control, "f")
    strategy = StrategyIn(learning_rate=1e-4, local_epochs=3, max_grad_norm=1.0, weight_decay=0.01,
                          round_config=RoundConfigIn(timeout_seconds=900, min_samples_per_client=50),
                          device_filter={"min_ram_mb": 6144, "min_storage_mb": 2048})
    changes = apply_strategy(control.config("f"), strategy, strategy.round_config, strategy.device_filter)
    assert changes["training"].learning_rate == 1e-4 and changes["training"].local_epochs == 3
    assert changes["policy"].min_samples_per_client == 50 and changes["policy"].timeout_seconds == 900
    assert changes["device_filter"].min_storage_mb == 2048
    answer = control.set_strategy("f", strategy)  # a round is open: it waits for the next
    assert answer["applies_from_round"] == 2 and answer["applied"] == "when the next round opens"
    assert control.config("f").training.learning_rate != 1e-4


def test_algorithm_presets_and_overrides_reach_the_config_with_their_server_lr(plane):
    _, _, control, _, _ = plane
    _session(control, "f")
    current = control.config("f")
    adam = apply_strategy(current, None, None, None, "fedadam", AggregationIn(beta2=0.999))
    assert adam["aggregation"].optimizer == "adam" and adam["aggregation"].beta2 == 0.999
    assert adam["policy"].server_lr == 1e-2  # the adaptive family's default, unless the request sets one
    explicit = apply_strategy(current, None, RoundConfigIn(server_lr=0.003), None, "fedyogi")
    assert explicit["policy"].server_lr == 0.003
    prox = apply_strategy(current, StrategyParams(), None, None, "fedprox")
    assert prox["training"].proximal_mu == 0.01
    dp = apply_strategy(current, None, None, None, "dp_fedavg",
                        AggregationIn(sampling_rate=0.1, dp={"noise_multiplier": 1.2, "max_epsilon": 8}))
    assert (dp["aggregation"].dp_noise_multiplier, dp["aggregation"].dp_max_epsilon) == (1.2, 8)
    assert dp["aggregation"].sampling_rate == 0.1
    with pytest.raises(Refusal, match="n > 2|trimmed_mean combine only"):
        apply_strategy(current, None, None, None, "flexlora", AggregationIn(rule="trimmed_mean"))
    with pytest.raises(Refusal, match="tier ranks"):
        LoraIn(type="lora", rank=8, tier_ranks={"low": 16}).to_config()
    answer = control.set_strategy("f", StrategyIn(algorithm="ffa_lora"))
    assert answer["applies_from_round"] == 2
    assert control.state.federations.pending_config("f").aggregation.lora == "ffa"


def test_the_api_only_records_a_start_and_a_worker_publishes_v0_and_opens_the_round(tmp_path):
    clock, state, store = Clock(), FederationState(fakeredis.FakeRedis()), LocalObjectStore(tmp_path)
    coordinator = RoundCoordinator(state, store, Settings(), clock)
    sent: list[str] = []
    control = Control(state, coordinator, clock, begin=sent.append)  # as `fleettune api`: a task is sent
    session = _session(control, "f")
    assert (session["status"], session["current_round"], sent) == ("pending", 0, ["f"])
    assert not list(tmp_path.rglob("*.safetensors"))  # the API process built no adapter
    assert state.federations.starts_due(before=clock.now) == ["f"]  # what the sweep re-sends if the task is lost

    info = coordinator.start_requested("f")  # the worker's task
    assert (info.round, info.base_version) == (1, 0) and list(tmp_path.rglob("*.safetensors"))
    assert control.session(session["id"])["status"] == "active" and state.federations.starts_due(before=clock.now) == []
    assert coordinator.start_requested("f") is None and state.federations.current_round("f") == 1  # a redelivery: no-op

    stopped = control.stop_session(session["id"], "ops")  # a resume recorded, then stopped before a worker ran
    assert stopped["status"] == "stopped"
    assert control.resume("f")["status"] == "active" and sent == ["f", "f"]
    state.federations.stop("f", "stopped again")
    assert coordinator.start_requested("f") is None and state.federations.current_round("f") == 1  # the stop wins


def test_stopping_a_session_fails_its_open_round(plane):
    state, gateway, control, _, _ = plane
    session = _session(control, "f")
    assert control.stop_session(session["id"], "ops")["status"] == "stopped"
    assert state.rounds.round_info("f", 1).status == "failed"
    with pytest.raises(Refusal, match="no_open_round"):
        gateway.check_in("f", DeviceProfile("a", ram_mb=2000), "u")
    with pytest.raises(Refusal, match="session_ended"):
        control.stop_session(session["id"], "ops")


def test_the_api_serves_local_presigned_urls_with_the_same_rules_as_s3(tmp_path):
    import hashlib

    import httpx

    from fleettune.shared.runtime import Runtime
    from fleettune.workers.api import create_app, serve_in_thread

    runtime = Runtime(Settings(), fakeredis.FakeRedis(), LocalObjectStore(tmp_path))
    app = create_app(runtime, lambda raw, at: None)
    signer = app.state.services.presigner
    blob = b"update bytes"
    with serve_in_thread(app) as url, httpx.Client(timeout=10) as http:
        put = signer.put("updates/f/000001/a.safetensors", 1e12, url, sha256=hashlib.sha256(blob).hexdigest(),
                         size=len(blob))
        assert http.put(put.url.replace("/a.safetensors", "/b.safetensors"), content=blob).status_code == 403
        assert http.put(put.url, content=b"other bytes!").status_code == 400  # bound to the sha256
        assert http.put(put.url, content=blob + b"more").status_code == 403  # and to the size, as S3 does
        assert http.put(put.url, content=blob[:-1]).status_code == 403
        assert http.put(put.url, content=blob).status_code == 200
        assert http.put(put.url, content=blob).status_code == 412  # write-once
        get = signer.get("updates/f/000001/a.safetensors", 1e12, url)
        assert http.get(get.url).content == blob
        assert http.get(get.url.replace("/a.safetensors", "/b.safetensors")).status_code == 403
        expired = signer.get("updates/f/000001/a.safetensors", 1.0, url)
        assert http.get(expired.url).json()["code"] == "url_expired"


def test_a_stopped_federation_resumes_through_the_api(plane, tmp_path):
    import httpx

    from fleettune.shared.runtime import Runtime
    from fleettune.workers.api import create_app, serve_in_thread

    state, _, control, _, _ = plane
    runtime = Runtime(Settings(), state.r, LocalObjectStore(tmp_path / "objects"))
    session = _session(Control(state, runtime.coordinator), "r")
    Control(state, runtime.coordinator).stop_session(session["id"], "ops")
    app = create_app(runtime, lambda raw, at: None)
    key = Tokens(state.r).create_api_key("admin")[1]
    with serve_in_thread(app) as url:
        headers = {"Authorization": f"Bearer {key}"}
        resumed = httpx.post(f"{url}/api/v1/federations/r/resume", headers=headers)
        assert resumed.status_code == 200 and (resumed.json()["status"], resumed.json()["round"]) == ("active", 2)
        again = httpx.post(f"{url}/api/v1/federations/r/resume", headers=headers)
        assert again.status_code == 409 and again.headers["content-type"] == "application/problem+json"
        # the id rule, said once (keys.ID_PATTERN): a ".." is the request's fault (422), never a conflict
        for bad in ("a..b", "a" * 65, ".a"):
            refused = httpx.post(f"{url}/api/v1/federations/r/devices", headers=headers, json={"device_id": bad})
            assert (refused.status_code, refused.json()["code"]) == (422, "invalid_request"), bad
        assert httpx.delete(f"{url}/api/v1/federations/r/devices/a..b", headers=headers).status_code == 422
        ok = httpx.post(f"{url}/api/v1/federations/r/devices", headers=headers, json={"device_id": "a.b-" + "c" * 60})
        assert ok.status_code == 201, ok.text


def test_deadlines_are_judged_by_receive_time(plane, tmp_path):
    import dataclasses

    from fleettune.shared.pipeline.ingest import Ingestor
    from fleettune.shared.pipeline.rounds import CLOSING, WAIT, decide

    state, gateway, control, sent, clock = plane
    _session(control, "f")  # deadline: 60 s after 1000
    fields = {"round": 1, "sha256": "ab" * 32, "num_samples": 7, "base_version": 0, "train_seconds": 0.0,
              "metrics": {}}
    on_time = gateway.submit("f", "a", fields)
    assert state.r.get(keys.round_inflight("f", 1)) == b"1"
    clock.now = 1061.0
    with pytest.raises(Refusal) as late:
        gateway.submit("f", "b", fields)
    assert (late.value.status, late.value.code) == (409, "late") and len(sent) == 1
    assert gateway.submit("f", "a", fields).receipt == on_time.receipt  # its repeat still gets its receipt

    info = dataclasses.replace(state.rounds.round_info("f", 1), inflight=1)
    assert decide(info, 1, 1, now=1061.0, grace=180) == WAIT  # a's message is on time, still in flight
    assert decide(info, 1, 1, now=1241.0, grace=180) == CLOSING  # the grace is bounded
    Ingestor(state, LocalObjectStore(tmp_path), Settings()).ingest(sent[0][0])  # its outcome (object missing)
    assert int(state.r.get(keys.round_inflight("f", 1))) == 0
    info = dataclasses.replace(info, inflight=0)
    assert decide(info, 1, 1, now=1061.0, grace=180) == CLOSING


def test_a_cosine_schedule_sets_each_rounds_learning_rate_in_the_plan(plane):
    state, gateway, control, _, _ = plane
    _session(control, "f", params=StrategyParams(learning_rate=0.01, lr_schedule="cosine", lr_floor=0.2))
    plan = gateway.check_in("f", DeviceProfile("a", ram_mb=2000), "http://api")
    assert plan["training"]["learning_rate"] == pytest.approx(0.01)  # round 1 of 2: the full rate
    last = state.federations.config("f").training.for_round(2, 2)
    assert last.learning_rate == pytest.approx(0.002) and last.lr_schedule == "cosine"
