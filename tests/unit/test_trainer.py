"""The device trainer on the packaged tiny Llama (a real model; no services)."""

import pytest
import torch

from fleettune.shared.protocol.adapter_spec import AdapterConfig, ModelDims, build_spec
from fleettune.shared.device import models, trainer
from fleettune.shared.federation import LocalTraining


@pytest.fixture(scope="module")
def tiny():
    return models.load_tokenizer("tiny"), models.load_model("tiny")


@pytest.mark.parametrize("adapter", [AdapterConfig(rank=4, alpha=8), AdapterConfig(kind="prompt_tuning", num_virtual_tokens=8)],
                         ids=["lora", "prompt"])
def test_weights_round_trip_and_training_lowers_the_loss(tiny, adapter):
    tokenizer, base = tiny
    model = trainer.peft_model(base, adapter)
    spec = build_spec(ModelDims.from_hf_config(base.config), adapter)
    try:
        weights = trainer.adapter_weights(model)
        assert {k: tuple(v.shape) for k, v in weights.items()} == spec.tensors  # PEFT's names = the protocol's
        g = torch.Generator().manual_seed(0)
        planted = {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in weights.items()}
        trainer.load_adapter_weights(model, planted)
        assert all(torch.equal(trainer.adapter_weights(model)[k], planted[k]) for k in planted)

        text = "Permission is hereby granted, free of charge, to any person obtaining a copy. " * 40
        data = trainer.blocks(tokenizer(text)["input_ids"], 64)
        before = trainer.perplexity(model, data)
        result = trainer.train(model, data, LocalTraining(learning_rate=1e-2, local_epochs=3, batch_size=4,
                                                             seq_len=64), seed=0)
        assert result.steps > 0 and result.samples == 3 * len(data)
        assert trainer.perplexity(model, data) < before
    finally:
        trainer.release(model)


def test_blocks_refuse_text_shorter_than_one_sequence():
    with pytest.raises(ValueError, match="fewer than one sequence"):
        trainer.blocks([1, 2, 3], 8)


def _rank4_on_licence_text(tiny):
    """A rank-4 LoRA on the tiny model, and a few 64-token sequences of licence text."""
    tokenizer, base = tiny
    text = "Permission is hereby granted, free of charge, to any person obtaining a copy. " * 40
    return trainer.peft_model(base, AdapterConfig(rank=4, alpha=8)), trainer.blocks(tokenizer(text)["input_ids"], 64)


def test_ffa_freezes_a_fedprox_pulls_toward_the_start_and_scaffold_shifts_every_gradient(tiny):
    model, data = _rank4_on_licence_text(tiny)
    try:
        start = trainer.adapter_weights(model)

        def trained(strategy=LocalTraining(learning_rate=1e-2, batch_size=4, seq_len=64, max_steps=3), **kw):
            trainer.load_adapter_weights(model, start)
            trainer.train(model, data, strategy, seed=0, **kw)
            return trainer.adapter_weights(model)

        def moved(weights):
            return sum(float((weights[k] - start[k]).norm() ** 2) for k in start) ** 0.5

        plain = trained()
        ffa = trained(freeze_lora_a=True)
        assert all(torch.equal(ffa[k], start[k]) for k in start if "lora_A" in k)
        assert any(not torch.equal(ffa[k], start[k]) for k in start if "lora_B" in k)
        assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)  # unfrozen after

        prox = trained(LocalTraining(learning_rate=1e-2, batch_size=4, seq_len=64, max_steps=3, proximal_mu=50.0))
        assert moved(prox) < moved(plain)

        zero = trained(correction={k: torch.zeros_like(v) for k, v in start.items()})
        assert all(torch.equal(zero[k], plain[k]) for k in start)  # c = c_i: plain training
        trainer.load_adapter_weights(model, start)
        result = trainer.train(model, data, LocalTraining(learning_rate=1e-2, batch_size=4, seq_len=64, max_steps=1),
                               seed=0, correction={k: torch.zeros_like(v) for k, v in start.items()})
        trainer.load_adapter_weights(model, start)
        model.train()
        batch = data[torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:4]]
        model(input_ids=batch, labels=batch).loss.backward()
        grads = {trainer.adapter_key(n): p.grad for n, p in model.named_parameters() if p.requires_grad}
        for k, g in result.mean_gradients.items():  # one step: the mean gradient is that step's raw gradient
            torch.testing.assert_close(g, grads[k])
        model.zero_grad(set_to_none=True)
        push = {k: torch.full_like(v, 10.0) for k, v in start.items()}  # a large c - c_i dominates the step
        shifted = trained(correction=push)
        assert all(float((shifted[k] - start[k]).mean()) < 0 for k in start)  # Adam steps against +c
    finally:
        trainer.release(model)


def test_a_kept_optimizer_state_carries_adams_moments_into_the_next_round(tiny):
    """bench/quality.py tune --keep-optimizer: a device that keeps its Adam moments resumes where
    it stopped, and its step count (Adam's bias correction) goes on."""
    model, data = _rank4_on_licence_text(tiny)
    try:
        start = trainer.adapter_weights(model)
        strategy = LocalTraining(learning_rate=1e-2, batch_size=4, seq_len=64, max_steps=2)
        kept: dict = {}
        trainer.train(model, data, strategy, seed=0, optimizer_state=kept)
        assert kept["state"] and all(float(s["step"]) == 2 for s in kept["state"].values())
        after_first = trainer.adapter_weights(model)
        trainer.train(model, data, strategy, seed=1, optimizer_state=kept)
        resumed = trainer.adapter_weights(model)
        assert all(float(s["step"]) == 4 for s in kept["state"].values())
        trainer.load_adapter_weights(model, after_first)
        trainer.train(model, data, strategy, seed=1)  # the same round from fresh moments
        fresh = trainer.adapter_weights(model)
        assert any(not torch.allclose(resumed[k], fresh[k]) for k in start)
    finally:
        trainer.release(model)


def test_the_round_schedule_decays_from_the_rate_to_its_floor():
    cosine = LocalTraining(learning_rate=0.1, lr_schedule="cosine", lr_floor=0.1)
    rates = [cosine.for_round(r, 5).learning_rate for r in range(1, 6)]
    assert rates[0] == pytest.approx(0.1) and rates[-1] == pytest.approx(0.01)
    assert rates[2] == pytest.approx(0.01 + 0.09 * 0.5)  # halfway: the cosine's midpoint
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert cosine.for_round(9, 5).learning_rate == pytest.approx(0.01)  # past the horizon: the floor
    assert cosine.for_round(3, 0) is cosine  # no horizon: the rate stays
    assert LocalTraining(learning_rate=0.1).for_round(3, 5).learning_rate == 0.1
    with pytest.raises(ValueError):
        LocalTraining(lr_schedule="linear")
