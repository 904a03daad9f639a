"""Rounds end to end on real Redis, real S3 (SeaweedFS) and two real Celery worker processes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fleettune.shared.protocol import versions
from tests.reference import median_claim, next_global, random_deltas

pytestmark = pytest.mark.services

DEVICES = [f"phone-{i:02d}" for i in range(20)]


def _round_inputs(config, round_no: int, seed: int):
    rng = np.random.default_rng([seed, round_no])
    # a spread of magnitudes: some updates are clipped, some are not
    deltas = [random_deltas(config.spec.tensors, rng, scale) for scale in np.geomspace(1e-3, 3e-2, len(DEVICES))]
    samples = [int(n) for n in rng.integers(5, 400, len(DEVICES))]
    samples[3] = 10**6  # claims far more than the cap allows
    return deltas, samples


def _run_rounds(pipeline, config, rounds: int, seed: int, times: int = 1):
    """Send every device's update each round; return the reference globals per version."""
    prev = pipeline.version_arrays(config, 0)
    expected, reference_claim = {}, None  # a round's weight cap derives from the previous round's median claim
    for round_no in range(1, rounds + 1):
        deltas, samples = _round_inputs(config, round_no, seed)
        for device, delta, n in zip(DEVICES, deltas, samples):
            pipeline.submit(config, round_no, device, delta, num_samples=n, times=times)
        info = pipeline.wait_round(config, round_no)
        assert info.status == "closed", info
        assert info.version == round_no
        policy = config.policy
        prev = next_global(prev, deltas, samples, policy.max_update_norm, policy.max_num_samples, policy.server_lr,
                           reference_claim=reference_claim)
        reference_claim = median_claim(samples, policy.max_num_samples)
        expected[round_no] = prev
    return expected


def test_three_rounds_of_twenty_devices_match_the_numpy_reference(pipeline, tmp_path):
    config = pipeline.create(devices=DEVICES, max_update_norm=1.0, server_lr=0.8, max_num_samples=500, max_rounds=3)

    expected = _run_rounds(pipeline, config, rounds=3, seed=11)

    for version, reference in expected.items():
        actual = pipeline.version_arrays(config, version)
        assert actual.keys() == reference.keys()
        worst = max(float(np.max(np.abs(actual[k].astype(np.float64) - reference[k]))) for k in reference)
        assert worst <= 1e-6, f"version {version} differs from the reference by {worst}"
        manifest = versions.manifest(pipeline.runtime.store, config.name, version)
        assert manifest["contributors"] == sorted(DEVICES)
        assert manifest["parent_version"] == version - 1
        assert 0 < manifest["update_norms"]["clipped"] < len(DEVICES)
    assert pipeline.runtime.state.federations.status(config.name)["status"] == "completed"
    assert versions.current_version(pipeline.runtime.store, config.name) == 3
    stats = pipeline.runtime.state.federations.stats(config.name)
    assert stats["accepted"] == stats["received"] == 60


def test_every_published_version_loads_in_peft_and_changes_the_output(pipeline, tmp_path):
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    config = pipeline.create(devices=DEVICES[:4], max_rounds=2, max_update_norm=None)
    for round_no in (1, 2):
        for i, device in enumerate(DEVICES[:4]):
            rng = np.random.default_rng([round_no, i])
            pipeline.submit(config, round_no, device, random_deltas(config.spec.tensors, rng, 0.05))
        assert pipeline.wait_round(config, round_no).status == "closed"

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**config.model.llama_config())).eval()
    ids = torch.arange(24).unsqueeze(0)
    with torch.no_grad():
        base_logits = base(ids).logits.clone()
    outputs = []
    for version in (0, 1, 2):
        directory = tmp_path / f"v{version}"
        versions.download(pipeline.runtime.store, config.name, version, directory)
        model = PeftModel.from_pretrained(base, str(directory)).eval()
        with torch.no_grad():
            outputs.append(model(ids).logits.clone())
        base = model.unload()  # back to the plain base for the next version

    assert torch.allclose(outputs[0], base_logits, atol=1e-6)  # version 0 starts as a no-op (B = 0)
    assert not torch.allclose(outputs[1], base_logits, atol=1e-4)
    assert not torch.allclose(outputs[2], outputs[1], atol=1e-4)


def test_every_envelope_delivered_twice_gives_the_same_adapter_as_once(pipeline):
    once = pipeline.create(devices=DEVICES, max_rounds=2)
    twice = pipeline.create(devices=DEVICES, max_rounds=2)

    _run_rounds(pipeline, once, rounds=2, seed=5, times=1)
    before = pipeline.runtime.state.federations.stats(None).get("redelivered", 0)
    _run_rounds(pipeline, twice, rounds=2, seed=5, times=2)

    for version in (1, 2):
        a = versions.manifest(pipeline.runtime.store, once.name, version)
        b = versions.manifest(pipeline.runtime.store, twice.name, version)
        # equal to float rounding, not bit for bit: which process folded which update into which
        # partial sum changes the order of the additions
        x, y = pipeline.version_arrays(once, version), pipeline.version_arrays(twice, version)
        assert max(float(np.max(np.abs(x[k] - y[k]))) for k in x) <= 1e-7
        assert (a["contributors"], a["total_samples"], a["total_weight"]) == (
            b["contributors"], b["total_samples"], b["total_weight"])
    assert pipeline.runtime.state.federations.stats(twice.name)["accepted"] == 40
    assert pipeline.runtime.state.federations.stats(twice.name)["received"] == 40
    assert pipeline.runtime.state.federations.stats(None)["redelivered"] - before == 40
