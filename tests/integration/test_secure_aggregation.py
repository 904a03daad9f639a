"""Secure aggregation on the real services: devices speak only to the API process, worker processes
unmask in the close, and the published version equals plain FedAvg of the same clipped updates
within the fixed point's bound, with devices vanishing mid-protocol and hostile messages refused."""

from __future__ import annotations

import itertools
import time

import httpx
import numpy as np
import pytest
from safetensors.numpy import load

from fleettune import DeviceClient, Federation, FleettuneAPIError
from fleettune.shared.protocol import versions
from fleettune.shared.protocol.updates import encode_update
from fleettune.shared.secagg import primitives as crypto
from fleettune.shared.secagg.participant import Participant, flatten, new_identity

pytestmark = pytest.mark.services
PHONE = {"ram_mb": 8192, "storage_mb": 4096}
_names = itertools.count()
CLIP = 1.0


def _federation(pipeline, devices: int, stage_s: float = 4.0, dp: dict | None = None, algorithm: str = "fedavg",
                **secure) -> tuple[Federation, dict[str, DeviceClient]]:
    fed = f"sa-{next(_names)}-{int(time.time() * 1000) % 10**7}"
    federation = Federation(pipeline.admin_key, fed, pipeline.api_url)
    federation.create(model="tiny-llama")
    clients = {f"phone-{i}": DeviceClient(federation.register_device(f"phone-{i}", **PHONE), fed, pipeline.api_url)
               for i in range(devices)}
    federation.train(model="tiny-llama", algorithm=algorithm, rounds=2, min_updates=2,
                     round_config={"max_update_norm": CLIP},
                     aggregation={"secure_aggregation": {"stage_timeout_s": stage_s, **secure},
                                  **({"dp": dp} if dp else {})})
    return federation, clients


def _participants(pipeline, fed: str, clients: dict[str, DeviceClient], seed: int = 0) -> dict[str, Participant]:
    """Each device checks in, registers its identity and holds a random clipped update and a weight."""
    rng = np.random.default_rng(seed)
    out = {}
    for device, client in clients.items():
        plan = client.check_in(**PHONE)
        secure = plan["secure_aggregation"]
        assert plan["upload"] is None and secure["clip"] == CLIP
        private, public = new_identity()
        client.register_identity(public)
        delta = {k: rng.normal(0, 0.02, size=s).astype(np.float32)
                 for k, s in pipeline.runtime.state.federations.config(fed).update_tensors.items()}
        x = flatten(delta, secure["tensors"], secure["clip"])
        out[device] = Participant(device, private, fed, plan, x, int(rng.integers(1, 40)), rng)
    return out


def _drive(clients, participants, vanish=lambda device, stage, attempt: False, timeout: float = 90) -> None:
    """Step every participant, interleaved; `vanish(device, stage, attempt)` says who skips a stage."""
    end = time.monotonic() + timeout
    pending = dict(participants)
    while pending:
        for device, p in list(pending.items()):
            try:
                state = clients[device].secagg_stage(p.round)
            except FleettuneAPIError as err:
                assert err.code == "stage_closed", err
                pending.pop(device)  # the round closed: nothing more to send
                continue
            if vanish(device, state["stage"], state["attempt"]):
                continue
            if p.step(clients[device]):
                pending.pop(device)
        assert time.monotonic() < end, f"{sorted(pending)} still at it"
        time.sleep(0.05)


def _wait_round(federation: Federation, round_no: int, timeout: float = 60) -> dict:
    end = time.monotonic() + timeout
    while (body := federation.round(round_no))["status"] not in ("closed", "failed"):
        assert time.monotonic() < end, f"round {round_no} still {body['status']}"
        time.sleep(0.1)
    return body


def _published_step(pipeline, fed: str, version: int) -> tuple[np.ndarray, dict]:
    config = pipeline.runtime.state.federations.config(fed)
    store = pipeline.runtime.store
    new = load(store.get(f"federations/{fed}/versions/{version:06d}/adapter_model.safetensors"))
    old = load(store.get(f"federations/{fed}/versions/{version - 1:06d}/adapter_model.safetensors"))
    names = sorted(config.update_tensors)
    step = np.concatenate([(new[k].astype(np.float64) - old[k].astype(np.float64)).ravel() for k in names])
    return step, versions.manifest(store, fed, version)


def test_a_third_vanishing_after_sharing_still_publishes_plain_fedavg_within_the_bound(pipeline):
    federation, clients = _federation(pipeline, 9)
    fed = federation.name
    participants = _participants(pipeline, fed, clients)
    gone = {"phone-1", "phone-4", "phone-7"}  # a third: they shared their keys, then lost the network
    _drive(clients, participants, vanish=lambda d, stage, attempt: d in gone and stage in ("masked", "unmask"),
           timeout=120)
    body = _wait_round(federation, 1)
    assert body["status"] == "closed", body
    step, manifest = _published_step(pipeline, fed, 1)
    survivors = sorted(set(clients) - gone)
    assert manifest["contributors"] == survivors
    secure = manifest["aggregation"]["secure_aggregation"]
    assert secure["dropped_after_sharing"] == 3 and secure["survivors"] == 6
    plain = sum(participants[d].weight * participants[d].update for d in survivors) / sum(
        participants[d].weight for d in survivors)
    bound = secure["mean_error_bound"] + 2.0 ** -23 * float(np.abs(step).max() + 1)  # fixed point, float32 storage
    assert float(np.abs(step - plain).max()) <= bound
    assert manifest["total_samples"] == sum(participants[d].weight for d in survivors)
    # what the store holds of each device is uniform-looking: no masked input correlates with its update
    for d in survivors:
        masked = np.frombuffer(pipeline.runtime.store.get(f"secagg/{fed}/000001/1/{d}.bin"),
                               dtype=np.dtype(f"<u{secure['modulus_bits'] // 8}"))
        signed = masked.astype(np.float64)
        assert abs(np.corrcoef(signed[1:], participants[d].update)[0, 1]) < 0.05


def test_below_the_threshold_the_attempt_restarts_with_fresh_keys_and_the_round_completes(pipeline):
    """Under FFA-LoRA (the exact-LoRA scheme that composes: A stays frozen, only B is summed)."""
    federation, clients = _federation(pipeline, 6, stage_s=3.0, algorithm="ffa_lora")
    fed = federation.name
    participants = _participants(pipeline, fed, clients, seed=1)
    silent = {"phone-0", "phone-1", "phone-2", "phone-3"}  # in attempt 1 they never answer the unmasking
    _drive(clients, participants, vanish=lambda d, stage, attempt: d in silent and stage == "unmask" and attempt == 1,
           timeout=120)
    assert _wait_round(federation, 1)["status"] == "closed"
    step, manifest = _published_step(pipeline, fed, 1)
    secure = manifest["aggregation"]["secure_aggregation"]
    # the two that gave out shares in attempt 1 sit attempt 2 out: two sums may differ by them, not by one
    assert secure["attempt"] == 2 and manifest["contributors"] == sorted(silent)
    assert {participants[d].outcome for d in set(clients) - silent} == {"sat_out"}
    assert all(name.endswith("lora_B.weight") for name in participants["phone-0"].plan["secure_aggregation"]["tensors"])
    plain = sum(participants[d].weight * participants[d].update for d in silent) / sum(
        participants[d].weight for d in silent)
    assert float(np.abs(step - plain).max()) <= secure["mean_error_bound"] + 2.0 ** -23 * float(np.abs(step).max() + 1)
    stats = pipeline.runtime.state.federations.stats(fed)
    assert stats.get("secagg_failed:too_few_shares") == 1


def test_hostile_messages_are_refused_by_name_and_the_honest_devices_finish(pipeline):
    federation, clients = _federation(pipeline, 5)
    fed = federation.name
    participants = _participants(pipeline, fed, clients, seed=2)
    mallory = clients["phone-0"]
    round_no = participants["phone-0"].round

    def refused(call) -> tuple[int, str]:
        with pytest.raises(FleettuneAPIError) as err:
            call()
        return err.value.status, err.value.code

    # an update in the clear is refused before it can be uploaded
    plan = participants["phone-0"].plan
    assert refused(lambda: mallory.send(plan, encode_update({"x": np.zeros(2, np.float32)}), 10)) == (
        409, "secure_aggregation")
    # the identity key cannot be replaced once registered
    assert refused(lambda: mallory.register_identity(new_identity()[1]))[1] == "identity_conflict"
    # keys signed by another identity, garbage and a missing field
    forged_keys = {"device": "phone-0", "c_pk": crypto.agreement_public(crypto.agreement_key()),
                   "s_pk": crypto.agreement_public(crypto.agreement_key()), "attempt": 1}
    forged_keys["sig"] = crypto.sign(crypto.identity_key(), b"anything")
    assert refused(lambda: mallory.secagg_answer(round_no, "advertise", forged_keys)) == (422, "bad_signature")
    assert refused(lambda: mallory.secagg_answer(round_no, "advertise", {"attempt": 1})) == (422, "malformed")
    raw = httpx.post(f"{pipeline.api_url}/api/v1/federations/{fed}/secagg/{round_no}/advertise", content=b"\xc1\xff",
                     headers={"Authorization": mallory.client.http.headers["Authorization"]})
    assert (raw.status_code, raw.json()["code"]) == (422, "malformed")
    huge = httpx.post(f"{pipeline.api_url}/api/v1/federations/{fed}/secagg/{round_no}/advertise",
                      content=b"\0" * (300 * 1024), headers={"Authorization": mallory.client.http.headers["Authorization"]})
    assert huge.status_code == 413
    # a stage that is not open, and an answer given twice
    assert refused(lambda: mallory.secagg_answer(round_no, "unmask", {"attempt": 1}))[1] == "stage_closed"
    participants["phone-0"].step(mallory)  # its honest advertisement
    session = participants["phone-0"].session
    again = dict(session.advertise(), attempt=1)
    assert refused(lambda: mallory.secagg_answer(round_no, "advertise", again)) == (409, "duplicate_stage")
    # another federation's device token cannot touch this round
    _, others = _federation(pipeline, 2)
    outsider = next(iter(others.values()))
    foreign = DeviceClient(outsider.client.http.headers["Authorization"].split()[1], fed, pipeline.api_url)
    assert refused(lambda: foreign.secagg_stage(round_no))[0] == 403
    _drive(clients, participants, timeout=120)
    assert _wait_round(federation, 1)["status"] == "closed"
    stats = pipeline.runtime.state.federations.stats(fed)
    assert stats["secagg_refused:bad_signature"] == 1 and stats["secagg_refused:duplicate_stage"] == 1
    assert stats["secagg_refused:malformed"] == 2


def test_distributed_dp_the_devices_add_the_noise_and_the_server_publishes_the_central_level(pipeline):
    federation, clients = _federation(pipeline, 6, dp={"noise_multiplier": 1.0})
    fed = federation.name
    participants = _participants(pipeline, fed, clients, seed=3)
    assert {p.plan["secure_aggregation"]["max_weight"] for p in participants.values()} == {1}
    for p in participants.values():
        p.weight = 1  # under DP every clipped update counts the same
    _drive(clients, participants, timeout=120)
    assert _wait_round(federation, 1)["status"] == "closed"
    step, manifest = _published_step(pipeline, fed, 1)
    agg = manifest["aggregation"]
    # sized for 4 survivors of 6 (dropout 1/3); all 6 survived: the devices' noise is √(6/4)·z·C, no top-up
    assert agg["dp_device_noise_std_on_sum"] == pytest.approx(np.sqrt(6 / 4) * CLIP)
    assert agg["dp_server_noise_std_on_sum"] == 0.0
    plain = sum(p.update for p in participants.values()) / 6
    noise = (step - plain) * 6  # the noise on the sum, as published
    assert abs(float(np.std(noise)) / (np.sqrt(6 / 4) * CLIP) - 1) < 0.05
    assert manifest["dp"]["epsilon"] > 0  # the accountant reports epsilon as for central DP


@pytest.mark.parametrize("aggregation, refused", [
    ({"rule": "median"}, "the median and trimmed mean need each update"),
    ({"lora": "exact"}, "FlexLoRA's exact mean re-factorises each product"),
])
def test_rules_that_need_each_update_are_refused_under_secure_aggregation(pipeline, aggregation, refused):
    federation, _ = _federation(pipeline, 2)
    with pytest.raises(FleettuneAPIError) as err:
        federation.client.put(f"/api/v1/federations/{federation.name}/strategy",
                              {"aggregation": {**aggregation, "secure_aggregation": {}}})
    assert (err.value.status, err.value.code) == (422, "invalid_config") and refused in err.value.detail


def test_an_identity_key_the_operator_registers_is_the_one_the_device_must_use(pipeline):
    federation, _ = _federation(pipeline, 2)
    private, public = new_identity()
    token = federation.register_device("op-phone", **PHONE, identity_key=public)
    phone = DeviceClient(token, federation.name, pipeline.api_url)
    with pytest.raises(FleettuneAPIError) as err:  # a device holding only the token cannot swap the key
        phone.register_identity(new_identity()[1])
    assert (err.value.status, err.value.code) == (409, "identity_conflict")
    assert phone.register_identity(public)["public_key"] == public.hex()
    assert pipeline.runtime.coordinator.secure.identities(federation.name, ["op-phone"]) == {"op-phone": public}
    federation.revoke_device("op-phone")  # and revoking the device forgets it
    assert pipeline.runtime.coordinator.secure.identities(federation.name, ["op-phone"]) == {}
    assert crypto.identity_public(private) == public
