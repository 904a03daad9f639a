"""Groups, tiers and canary rollouts through `fleettune api`, real workers, Redis, S3 and the tiny model.

Versions come out of the real round pipeline: a good adapter (trained on legal text) and a bad one
(trained on shuffled tokens) are each one device's update. Devices check in over HTTP, download
what the gateway tells them to serve, measure its loss on their own held-out text with the real
model, and report it; the rollout's gates act on those reports alone.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from fleettune import DeviceClient, Federation, FleettuneAPIError
from fleettune.shared import corpora
from fleettune.shared.protocol.adapter_spec import initial_weights
from fleettune.shared.device import models, trainer
from fleettune.shared.device.serving import ServingFleet
from fleettune.shared.federation import EvaluationConfig, LocalTraining
from fleettune.shared.strategies.config import AggregationConfig

pytestmark = pytest.mark.services
DEVICES = 150


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(2)
    tokenizer = models.load_tokenizer("tiny")
    return tokenizer, models.load_model("tiny")


def _train(model, data: torch.Tensor, lr: float, steps: int) -> dict[str, torch.Tensor]:
    trainer.train(model, data, LocalTraining(learning_rate=lr, batch_size=8, max_steps=steps, seq_len=64), seed=0)
    return trainer.adapter_weights(model)


def _publish(pipeline, config, round_no: int, weights: dict[str, torch.Tensor]) -> None:
    """One device's update that moves the global adapter to `weights` (FedAvg of one, no clip)."""
    current = pipeline.version_arrays(config, round_no - 1)
    delta = {k: weights[k].numpy() - current[k] for k in current}
    pipeline.submit(config, round_no, "trainer", delta)
    assert pipeline.wait_round(config, round_no, timeout=120).status == "closed"


@pytest.fixture(scope="module")
def versions_of(pipeline, tiny):
    """A federation with v1 good (legal text) and v2 bad (then shuffled tokens), both evaluated by the server."""
    tokenizer, base = tiny
    config = pipeline.create(devices=["trainer"], min_updates=1, max_rounds=2, max_update_norm=None,
                             aggregation=AggregationConfig(incremental=False),
                             evaluation=EvaluationConfig(base_model="tiny", domains=("legal",), eval_chars=4000))
    model = trainer.peft_model(base, config.adapter)
    trainer.load_adapter_weights(model, initial_weights(config.spec, config.seed))
    # legal text, where the tiny base is weak: a real gain (about 1.2 nats) with forgetting inside the gate
    text = trainer.blocks(tokenizer(corpora.train_text("legal", 60_000))["input_ids"], 64)
    good = _train(model, text, 1e-3, 40)
    garbage = text.flatten()[torch.randperm(text.numel(), generator=torch.Generator().manual_seed(0))].view_as(text)
    # lr 3e-2: about 1 nat worse per device than v1. At 1e-2 (0.40 nats) a small canary arm left
    # 2-5 % of rollouts at 10 % inconclusive for good (python bench/canary_power.py)
    bad = _train(model, garbage, 3e-2, 40)
    trainer.release(model)
    _publish(pipeline, config, 1, good)
    _publish(pipeline, config, 2, bad)
    end = time.monotonic() + 180
    while None in (pipeline.runtime.state.evaluations.evaluation(config.name, v) for v in (1, 2)):
        assert time.monotonic() < end, "versions were not evaluated"
        time.sleep(0.2)
    return config


def _fleet(pipeline, fed: str, tiny) -> ServingFleet:
    """Devices with their own held-out text, measuring whatever version they are told to serve."""
    tokenizer, base = tiny
    admin = Federation(pipeline.admin_key, fed, pipeline.api_url)
    clients = {f"user-{i}": DeviceClient(admin.register_device(f"user-{i}"), fed, pipeline.api_url)
               for i in range(DEVICES)}
    heldout = trainer.blocks(tokenizer(corpora.heldout_text("legal", 120_000))["input_ids"], 64)
    texts = {d: heldout[4 * i:4 * i + 4] for i, d in enumerate(clients)}  # 256 tokens each, none shared
    return ServingFleet(trainer.peft_model(base, pipeline.runtime.state.federations.config(fed).adapter), clients, texts)


def test_a_good_version_reaches_everyone_and_a_bad_one_is_rolled_back_from_device_reports(pipeline, versions_of,
                                                                                           tiny):
    fed = versions_of.name
    admin = Federation(pipeline.admin_key, fed, pipeline.api_url)
    fleet = _fleet(pipeline, fed, tiny)
    try:
        # canaries start at 20 %: at 10 % of 150 devices, a few rollout ids in a thousand leave fewer
        # than min_reports devices in the arm, and a rollout with no comparison never settles
        good = admin.rollout(1, start_percent=20, step_percent=30, min_step_seconds=0, gates={"min_reports": 5},
                             start=True)
        assert (good["status"], good["percent"]) == ("active", 20)
        assert fleet.until_settled()["rollout_status"] == "completed"
        good = admin.get_rollout(good["id"])
        assert [h["to_percent"] for h in good["history"] if h["action"] == "advance"] == [50, 80, 100]
        assert admin.serving()["serving"] == 1
        assert good["arms"]["canary"]["eval_loss"] < good["arms"]["control"]["eval_loss"]

        # a deadline shorter than a step's minimum would pause every step before it could advance
        with pytest.raises(FleettuneAPIError) as refused:
            admin.rollout(2, min_step_seconds=3600, max_step_seconds=600)
        assert refused.value.code == "invalid_config" and "max_step_seconds" in str(refused.value)
        # the server's own evaluation already sees that v2 is worse and will not start it
        with pytest.raises(FleettuneAPIError) as refused:
            admin.rollout(2, start=True)
        assert refused.value.code == "server_gate_failed"
        pending = admin.rollouts()[0]
        admin.rollout_action(pending["id"], "rollback", reason="server gate failed")
        # an operator who overrides the server's gate still has the devices' gate
        loose = {"max_perplexity_ratio": 100, "max_forgetting_ratio": 100, "min_reports": 5}
        bad = admin.rollout(2, start_percent=20, step_percent=30, min_step_seconds=0, gates=loose, start=True)
        before = fleet.check_ins
        assert fleet.until_settled()["rollout_status"] == "rolled_back"
        bad = admin.get_rollout(bad["id"])
        assert bad["history"][-1]["by"] == "auto" and "eval_loss" in bad["history"][-1]["reason"]
        assert fleet.check_ins - before <= DEVICES  # bounded: within one pass of the fleet
        assert all(c.serving()["version"] == 1 for c in list(fleet.clients.values())[:20])
    finally:
        trainer.release(fleet.model)


def test_dynamic_groups_are_evaluated_at_each_check_in_and_target_a_rollout(pipeline, versions_of):
    fed = versions_of.name
    admin = Federation(pipeline.admin_key, fed, pipeline.api_url)
    body = admin.set_group("android-big", rules={"min_ram_mb": 4096, "os": ["android"], "min_app_version": "2.0"})
    assert (body["group"], body["kind"]) == ("android-big", "dynamic")
    phone = DeviceClient(admin.register_device("grouped-phone"), fed, pipeline.api_url)
    small = {"ram_mb": 2048, "os": "android", "app_version": "2.3.1"}
    assert "android-big" not in _plan(phone, small)["groups"]
    assert "android-big" in _plan(phone, dict(small, ram_mb=8192))["groups"]
    assert admin.group("android-big")["matched"] == ["grouped-phone"]
    assert "android-big" not in _plan(phone, dict(small, ram_mb=8192, app_version="1.9"))["groups"]
    assert admin.group("android-big")["matched"] == []
    with pytest.raises(FleettuneAPIError) as refused:
        phone.check_in(ram_mb=8192, os="android; drop table")  # declared capabilities are validated
    assert refused.value.status == 422


def _plan(client: DeviceClient, capabilities: dict) -> dict:
    try:
        return client.check_in(**capabilities)
    except FleettuneAPIError as refused:  # no open round: the refusal carries groups and serve too
        assert refused.code == "no_open_round"
        return refused.body


def test_each_tier_gets_its_variant_and_tier_2s_distilled_adapter_loads_on_its_base(pipeline, tiny, tmp_path):
    from peft import PeftModel

    from fleettune.shared import keys
    from fleettune.shared.protocol import versions
    from tests.reference import random_deltas

    config = pipeline.create(devices=["t1"], min_updates=1, max_rounds=1, max_update_norm=None,
                             evaluation=EvaluationConfig(base_model="tiny", domains=("literature",), eval_chars=3000))
    admin = Federation(pipeline.admin_key, config.name, pipeline.api_url)
    admin.set_deployment({
        "flagship": {"mode": "train"},
        "mid": {"mode": "infer", "base_model": "tiny", "adapter": "distilled",
                "distillation": {"prompts": 8, "new_tokens": 24, "steps": 20}},
        "iot": {"mode": "api", "api_url": "https://fleettune.example/v1/generate"}})
    pipeline.submit(config, 1, "t1", random_deltas(config.spec.tensors, np.random.default_rng(0), 0.05))
    assert pipeline.wait_round(config, 1, timeout=120).status == "closed"
    end = time.monotonic() + 240
    while not pipeline.runtime.redis.zscore(keys.fed_distilled(config.name, "mid"), "1"):
        assert time.monotonic() < end, "version 1 was not distilled for tier mid"
        time.sleep(0.5)
    while pipeline.runtime.state.evaluations.evaluation(config.name, 1) is None:
        assert time.monotonic() < end, "version 1 was not evaluated"
        time.sleep(0.2)
    rollout = admin.rollout(1, gates={"max_perplexity_ratio": 100, "max_forgetting_ratio": 100}, start=True)
    admin.rollout_action(rollout["id"], "promote", reason="tier test")

    devices = {tier: DeviceClient(admin.register_device(f"{tier}-1", tier=tier), config.name, pipeline.api_url)
               for tier in ("flagship", "mid", "iot")}
    with pytest.raises(FleettuneAPIError) as refused:  # the session is over: nothing to train, v1 to serve
        devices["flagship"].check_in(tier="flagship")
    serve = refused.value.body["serve"]
    assert (serve["mode"], serve["version"], serve["adapter"]["kind"]) == ("train", 1, "federation")
    iot = devices["iot"].check_in(tier="iot")
    assert (iot["action"], iot["serve"]["api_url"]) == ("api", "https://fleettune.example/v1/generate")
    mid = devices["mid"].check_in(tier="mid")
    assert (mid["action"], mid["serve"]["base_model"]) == ("infer", "tiny")
    assert mid["serve"]["adapter"]["kind"] == "distilled"
    for name in (versions.ADAPTER_FILE, versions.CONFIG_FILE):
        (tmp_path / name).write_bytes(devices["mid"].download_served(mid["serve"], name))
    manifest = versions.manifest(pipeline.runtime.store, config.name, 1)
    variant = pipeline.runtime.store.get(f"{keys.variant_prefix(config.name, 1, 'mid')}/{versions.MANIFEST_FILE}")
    variant = json.loads(variant)
    assert (variant["teacher_base_model"], variant["base_model"], manifest["version"]) == ("tiny", "tiny", 1)
    assert variant["student_loss_last"] < variant["student_loss_first"]  # it learned the teacher's text
    tokenizer, _ = tiny
    base = models.load_model("tiny")
    ids = tokenizer("To be, or not to be, that is the question", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, str(tmp_path)).eval()(ids).logits
    assert (after - before).abs().max() > 1e-3  # the distilled adapter loads on tier 2's base and acts
