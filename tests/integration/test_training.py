"""Devices that really train (PEFT on the packaged tiny Llama) through real Redis, S3 and workers."""

from __future__ import annotations

import pytest
import torch

from fleettune.shared.protocol import versions
from fleettune.shared.protocol.adapter_spec import AdapterConfig, ModelDims
from fleettune.shared.device import models, trainer
from fleettune.shared.device.fleet import FleetSpec, build_fleet
from fleettune.shared.federation import EvaluationConfig, FederationConfig, RoundPolicy, LocalTraining
from fleettune.shared.strategies.config import AggregationConfig
from fleettune.workers.local.harness import enroll

pytestmark = pytest.mark.services


@pytest.fixture(scope="module")
def tiny():
    return models.load_tokenizer("tiny"), models.load_model("tiny")


def _federate(pipeline, tiny, adapter: AdapterConfig, lr: float, name: str, rounds: int = 3,
              aggregation: AggregationConfig = AggregationConfig(), keep: list | None = None, **training):
    tokenizer, base = tiny
    config = FederationConfig(
        name=name, model=ModelDims.from_hf_config(base.config), adapter=adapter, base_model="tiny",
        policy=RoundPolicy(min_updates=2, max_rounds=rounds, max_update_norm=5.0, timeout_seconds=300),
        training=LocalTraining(learning_rate=lr, batch_size=8, seq_len=128, **training),
        evaluation=EvaluationConfig(base_model="tiny", eval_chars=8000), aggregation=aggregation,
    )
    model = trainer.peft_model(base, adapter)
    fleet = [device for device, _ in build_fleet(FleetSpec.spread(3, chars_per_device=16_000), config, model, tokenizer)]
    pipeline.runtime.state.federations.create(config, status="idle")
    clients = enroll(pipeline.api_url, pipeline.admin_key, config.name, fleet)  # devices hold only their tokens
    pipeline.runtime.coordinator.begin_training(config.name, rounds)
    for round_no in range(1, rounds + 1):
        for device in fleet:
            report = device.run_round(clients[device.device_id], seed=round_no)
            assert report.round == round_no and report.samples > 0 and report.train_seconds > 0
        assert pipeline.wait_round(config, round_no, timeout=120).status == "closed"
    evaluation = _wait_evaluation(pipeline, config.name, rounds)
    if keep is not None:
        keep.extend(fleet)
    base_model = trainer.release(model)  # leave the shared fixture without adapter layers
    return config, evaluation, base_model


def _wait_evaluation(pipeline, fed: str, version: int, timeout: float = 120) -> dict:
    import time

    end = time.monotonic() + timeout
    while (result := pipeline.runtime.state.evaluations.evaluation(fed, version)) is None:
        assert time.monotonic() < end, "evaluation did not arrive"
        time.sleep(0.1)
    return result


def test_lora_rounds_lower_held_out_perplexity_and_the_adapter_changes_the_model(pipeline, tiny, tmp_path):
    config, evaluation, base = _federate(pipeline, tiny, AdapterConfig(rank=8, alpha=16), lr=5e-3, name="train-lora")

    assert evaluation["heldout_mean"] < evaluation["base_heldout_mean"]
    assert set(evaluation["heldout"]) == {"literature", "legal", "code"}
    assert evaluation["forgetting_ratio"] > 0
    manifest = versions.manifest(pipeline.runtime.store, config.name, 3)
    assert manifest["evaluation"]["heldout_mean"] == evaluation["heldout_mean"]

    from peft import PeftModel

    versions.download(pipeline.runtime.store, config.name, 3, tmp_path / "v3")
    ids = tiny[0]("Licensed under the Apache License", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = base(ids).logits.clone()
        adapted = PeftModel.from_pretrained(base, str(tmp_path / "v3")).eval()
        after = adapted(ids).logits.clone()
    trainer.release(adapted)
    assert (after - before).abs().max() > 1e-3


def test_prompt_tuning_rounds_lower_held_out_perplexity(pipeline, tiny):
    _, evaluation, _ = _federate(pipeline, tiny, AdapterConfig(kind="prompt_tuning", num_virtual_tokens=16),
                                 lr=3e-2, name="train-prompt")
    assert evaluation["heldout_mean"] < evaluation["base_heldout_mean"]


def test_exact_aggregation_with_tier_ranks_16_8_4_publishes_an_adapter_per_tier_that_loads_in_peft(pipeline, tmp_path):
    """Heterogeneous ranks through the real pipeline: each tier trains its own rank on its own model."""
    from peft import PeftModel

    from fleettune.shared.device.client import Device
    from fleettune.shared.strategies.config import AggregationConfig

    tokenizer = models.load_tokenizer("tiny")
    tiers = {"high": 16, "mid": 8, "low": 4}
    adapter = AdapterConfig(rank=16, alpha=16, tier_ranks=tuple(tiers.items()))
    dims = ModelDims.from_hf_config(models.load_model("tiny").config)
    config = FederationConfig(
        name="train-tiers", model=dims, adapter=adapter, base_model="tiny",
        policy=RoundPolicy(min_updates=3, max_rounds=2, max_update_norm=5.0, timeout_seconds=300),
        training=LocalTraining(learning_rate=5e-3, batch_size=8, seq_len=128),
        evaluation=EvaluationConfig(base_model="tiny", eval_chars=8000),
        aggregation=AggregationConfig.preset("flexlora"),
    )
    data = [device.data for device, _ in build_fleet(FleetSpec.spread(3, chars_per_device=16_000), config,
                                                      trainer.peft_model(models.load_model("tiny"), adapter), tokenizer)]
    fleet = [Device(f"dev-{tier}", config, trainer.peft_model(models.load_model("tiny"), adapter.for_rank(rank)),
                    data[i], config.training, tier=tier) for i, (tier, rank) in enumerate(tiers.items())]
    pipeline.runtime.state.federations.create(config, status="idle")
    clients = enroll(pipeline.api_url, pipeline.admin_key, config.name, fleet)
    pipeline.runtime.coordinator.begin_training(config.name, 2)
    for round_no in (1, 2):
        for device in fleet:
            device.run_round(clients[device.device_id], seed=round_no)
        assert pipeline.wait_round(config, round_no, timeout=120).status == "closed"
    evaluation = _wait_evaluation(pipeline, config.name, 2)
    assert evaluation["heldout_mean"] < evaluation["base_heldout_mean"]

    manifest = versions.manifest(pipeline.runtime.store, config.name, 2)
    assert manifest["aggregation"]["lora"] == "exact" and set(manifest["ranks"]) == {"8", "4"}
    assert len(manifest["contributors"]) == 3
    ids = tokenizer("Licensed under the Apache License", return_tensors="pt")["input_ids"]
    for rank in (16, 8, 4):
        directory = tmp_path / f"rank-{rank}"
        versions.download(pipeline.runtime.store, config.name, 2, directory, rank=None if rank == 16 else rank)
        base = models.load_model("tiny")
        with torch.no_grad():
            before = base(ids).logits.clone()
            adapted = PeftModel.from_pretrained(base, str(directory)).eval()
            assert adapted.peft_config["default"].r == rank
            after = adapted(ids).logits
        assert (after - before).abs().max() > 1e-4  # each tier's adapter changes its model


@pytest.mark.parametrize("algorithm", ["ffa_lora", "scaffold"])
def test_ffa_and_scaffold_devices_train_through_the_pipeline(pipeline, tiny, algorithm):
    """FFA-LoRA devices send B only; SCAFFOLD devices download the server's control variate and keep their own."""
    fleet = []
    config, evaluation, _ = _federate(pipeline, tiny, AdapterConfig(rank=8, alpha=16), lr=5e-3, name=f"train-{algorithm}",
                                      rounds=2, aggregation=AggregationConfig.preset(algorithm), keep=fleet)
    assert evaluation["heldout_mean"] < evaluation["base_heldout_mean"]
    store = pipeline.runtime.store
    v0 = versions.load_weights(store, config.name, 0, config.spec, 1 << 30, 1 << 20)
    v2 = versions.load_weights(store, config.name, 2, config.spec, 1 << 30, 1 << 20)
    if algorithm == "ffa_lora":
        assert all(torch.equal(v2[k], v0[k]) for k in v0 if "lora_A" in k)  # A never moved
        assert all(k.endswith("lora_B.weight") for k in config.update_tensors)
    else:
        control = versions.load_control(store, config.name, 2, 1 << 30)
        assert set(control) == set(config.spec.tensors) and any(float(v.abs().max()) > 0 for v in control.values())
        assert all(set(device.control) == set(config.spec.tensors) for device in fleet)  # each device's c_i
        assert set(config.update_tensors) == set(config.spec.tensors) | {f"scaffold.{k}" for k in config.spec.tensors}


@pytest.mark.parametrize("encoding, fewer", [("int8", 3.8), ("topk", 8.0)])
def test_compressed_updates_train_through_the_pipeline(pipeline, tiny, encoding, fewer):
    """Devices told to send int8 or top-k updates do (the objects in S3 are that much smaller), keep
    their error feedback, and the rounds still lower held-out perplexity."""
    from fleettune.shared import keys
    from fleettune.shared.protocol.compression import read_update
    from fleettune.shared.protocol.updates import encode_update

    fleet = []
    config, evaluation, _ = _federate(pipeline, tiny, AdapterConfig(rank=8, alpha=16), lr=5e-3, name=f"train-{encoding}",
                                      rounds=2, keep=fleet, update_encoding=encoding)
    assert evaluation["heldout_mean"] < evaluation["base_heldout_mean"]
    dense = len(encode_update({k: torch.zeros(s).numpy() for k, s in config.update_tensors.items()}))
    store = pipeline.runtime.store
    for device in fleet:
        blob = store.get(keys.update_object(config.name, 2, device.device_id))
        assert read_update(blob, config.update_tensors, 1 << 20)[1] == encoding and dense / len(blob) >= fewer
        assert device.compressor.encoding == encoding and set(device.compressor.residual) == set(config.update_tensors)
    assert pipeline.runtime.state.federations.stats(config.name).get("rejected", 0) == 0
