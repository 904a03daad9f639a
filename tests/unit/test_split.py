"""Split learning's pure parts on the real tiny model: the cut, DP at the cut, the wire, the server."""

from __future__ import annotations

import math

import pytest
import torch

from fleettune.shared.protocol.adapter_spec import AdapterConfig
from fleettune.shared.device import models, trainer
from fleettune.shared.errors import Refusal, Rejected
from fleettune.shared.split import bottleneck
from fleettune.shared.split import model as split_model
from fleettune.shared.split import wire
from fleettune.shared.split.config import SplitConfig
from fleettune.shared.split.device import LocalTransport, SplitDevice
from fleettune.shared.split.server import SplitServer


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = trainer.peft_model(models.load_model("tiny"), AdapterConfig(rank=4, alpha=8))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: give every LoRA weight a gradient to compare
            torch.nn.init.normal_(p, std=0.05)
    return model


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("mode,cut,top,rank,returns", [
    ("two_part", 1, 0, 0, "residual"), ("two_part", 3, 0, 0, "residual"), ("u_shaped", 1, 1, 0, "residual"),
    ("u_shaped", 2, 1, 0, "residual"), ("u_shaped", 1, 0, 0, "residual"), ("two_part", 1, 0, 128, "residual"),
    ("u_shaped", 1, 1, 128, "residual"), ("u_shaped", 1, 1, 0, "correction"), ("u_shaped", 2, 1, 128, "correction")])
def test_a_split_without_noise_computes_the_unsplit_loss_and_gradients(tiny, mode, cut, top, rank, returns):
    """The device's and the server's functions, chained as the two processes chain them, are the
    whole model: through the full-rank bottleneck too, with U-shaped's residual return, and with
    the server's LoRA correction added to the frozen layers the device runs itself."""
    model, layers = tiny, split_model.num_layers(tiny)
    config = SplitConfig(mode=mode, cut=cut, top_layers=top, clip=1e9, sigma=0.0, bottleneck=rank,
                         server_returns=returns)
    projection = bottleneck.projection(model, rank)
    ids = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(1))
    model.zero_grad(set_to_none=True)
    whole = model(input_ids=ids, labels=ids).loss
    whole.backward()
    expected = _grads(model)

    hidden, sent = split_model.device_message(model, ids, cut, projection, config.clip, config.sigma)
    received = sent.detach().requires_grad_(True)  # what the server gets: a leaf, no graph back
    server_layers = config.server_layers(layers)
    if returns == "correction":
        middle = split_model.server_correction(model, received, server_layers, bottleneck.lift(projection))
    else:
        middle = split_model.server_part(model, received, server_layers, bottleneck.lift(projection),
                                         residual=mode == "u_shaped")
    if mode == "two_part":
        loss = split_model.head_loss(model, middle, ids)
        loss.backward()
    else:
        back = middle.detach().requires_grad_(True)  # what the device gets back: the residual or the correction
        stream = hidden + back if returns == "residual" else (
            split_model.frozen_layers(model, hidden, server_layers) + back)
        top_out = split_model.run_layers(model, stream, range(layers - top, layers))
        loss = split_model.head_loss(model, top_out, ids)
        loss.backward(retain_graph=True)
        middle.backward(back.grad)
    sent.backward(received.grad)
    got = _grads(model)
    assert loss.item() == pytest.approx(whole.item(), abs=1e-4)
    assert got.keys() == expected.keys() and len(got) == 2 * 4 * layers
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-4, rtol=1e-3)


def test_the_bottleneck_is_the_same_on_every_side_and_narrows_the_message(tiny):
    first, again = bottleneck.projection(tiny, 16), bottleneck.projection(tiny, 16)
    assert torch.equal(first.basis, again.basis) and first.basis.shape == (128, 16)
    torch.testing.assert_close(first.basis.T @ first.basis, torch.eye(16), atol=1e-5, rtol=0)  # orthonormal
    assert (first.basis.gather(0, first.basis.abs().argmax(0, keepdim=True)) > 0).all()  # signs fixed
    assert bottleneck.projection(tiny, 0) is None
    with pytest.raises(ValueError, match="bottleneck 129"):
        bottleneck.projection(tiny, 129)
    config = SplitConfig(mode="u_shaped", bottleneck=16, seq_len=24)
    server = SplitServer(tiny, config)
    assert server.shapes(2, with_labels=False) == {"activations": (2, 24, 16)}
    torch.testing.assert_close(server.lift.weight, first.basis)  # no noise: the lift starts as the exact inverse
    noisy = SplitConfig(mode="u_shaped", bottleneck=16, seq_len=24, sigma=0.5)
    assert noisy.denoise_gain(128) == pytest.approx(1 / (1 + 0.25 * 24 * 16))  # least squares under the noise
    torch.testing.assert_close(SplitServer(tiny, noisy).lift.weight, first.basis * noisy.denoise_gain(128))
    ids = torch.randint(0, tiny.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    _, sent = split_model.device_message(tiny, ids, 1, first, clip=5.0, sigma=0.0)
    assert sent.shape == (2, 24, 16) and sent.flatten(1).norm(dim=1).max() <= 5.0 + 1e-4


def test_the_server_refuses_activations_its_clip_and_noise_cannot_explain(tiny):
    config = SplitConfig(mode="two_part", clip=10.0, sigma=0.5, seq_len=8, bottleneck=4)
    server = SplitServer(tiny, config)
    honest = split_model.privatize(torch.randn(16, 8, 4) * 100, 10.0, 0.5, torch.Generator().manual_seed(3))
    server.admit(honest)  # clipped and noised as the config says: admitted
    with pytest.raises(Rejected) as refused:
        server.admit(torch.randn(2, 8, 4) * 100)  # never clipped
    assert refused.value.reason.value == "norm_above_bound"


def test_dp_at_the_cut_clips_each_example_and_adds_noise_of_sigma_c():
    hidden = torch.randn(64, 16, 8) * torch.linspace(0.1, 10, 64).view(-1, 1, 1)
    clipped = split_model.privatize(hidden, clip=5.0, sigma=0.0)
    norms = clipped.flatten(1).norm(dim=1)
    assert norms.max() <= 5.0 + 1e-4
    small = hidden.flatten(1).norm(dim=1) < 5.0
    torch.testing.assert_close(clipped[small], hidden[small])  # under the bound: untouched
    noisy = split_model.privatize(hidden, clip=5.0, sigma=2.0, generator=torch.Generator().manual_seed(0))
    assert (noisy - clipped).std().item() == pytest.approx(10.0, rel=0.03)


def test_the_devices_epsilon_is_the_accountants_own(tiny):
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    config = SplitConfig(mode="two_part", cut=1, sigma=1.1, delta=1e-5)
    data = torch.zeros(80, 64, dtype=torch.long)
    device = SplitDevice(LocalTransport(SplitServer(tiny, config)), tiny, data, config, lr=1e-3, batch=8)
    device.steps = 250
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.1)), 250)
    accountant = RdpAccountant()
    accountant.compose(event)
    assert device.epsilon() == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert 0 < device.epsilon() < math.inf
    assert SplitDevice(LocalTransport(SplitServer(tiny, SplitConfig(mode="two_part"))), tiny, torch.zeros(8, 64,
                       dtype=torch.long), SplitConfig(mode="two_part"), 1e-3).epsilon() == math.inf


def test_malformed_messages_are_refused_by_name():
    shapes = {"activations": (2, 4, 8), "labels": (2, 4)}
    good = {"activations": torch.zeros(2, 4, 8), "labels": torch.zeros(2, 4, dtype=torch.long)}
    assert wire.decode(wire.encode(good), shapes, vocab=10)["labels"].shape == (2, 4)
    cases = {
        "bad_shape": dict(good, activations=torch.zeros(2, 4, 9)),
        "non_finite": dict(good, activations=torch.full((2, 4, 8), math.nan)),
        "bad_dtype": dict(good, activations=torch.zeros(2, 4, 8, dtype=torch.float16)),
        "bad_label": dict(good, labels=torch.full((2, 4), 10, dtype=torch.long)),
        "missing_keys": {"activations": good["activations"]},
        "unexpected_keys": dict(good, extra=torch.zeros(1)),
    }
    for reason, tensors in cases.items():
        with pytest.raises(Rejected) as refused:
            wire.decode(wire.encode(tensors), shapes, vocab=10)
        assert refused.value.reason.value == reason, reason
    for blob, reason in ((b"\x00" * 3, "truncated"), (b"\xff" * 16, "header_too_large"),
                         (wire.encode(good)[:-5], "truncated")):
        with pytest.raises(Rejected) as refused:
            wire.decode(blob, shapes, vocab=10)
        assert refused.value.reason.value == reason


def test_a_device_that_never_sends_its_backward_leaves_the_server_unchanged(tiny):
    now = [0.0]
    config = SplitConfig(mode="u_shaped", cut=1, top_layers=1, pending_ttl_s=30)
    server = SplitServer(tiny, config, clock=lambda: now[0])
    before = {k: v.clone() for k, v in server.weights().items()}
    step_id, residual = server.forward("phone", torch.randn(2, config.seq_len, server.hidden))
    assert residual.shape == (2, config.seq_len, server.hidden) and step_id in server.pending
    with pytest.raises(Refusal, match="unknown_step"):  # another device cannot finish it
        server.backward("other", step_id, torch.ones_like(residual))
    now[0] = 31.0
    with pytest.raises(Refusal, match="unknown_step"):  # expired: dropped, never stepped
        server.backward("phone", step_id, torch.ones_like(residual))
    assert server.steps == 0 and all(torch.equal(before[k], v) for k, v in server.weights().items())
    with pytest.raises(Refusal, match="batch_too_large"):
        server.shapes(config.max_batch + 1, with_labels=False)
    with pytest.raises(Refusal, match="wrong_mode"):
        server.two_part(torch.zeros(1, config.seq_len, server.hidden), torch.zeros(1, config.seq_len, dtype=torch.long))


def test_split_training_in_both_modes_lowers_the_loss(tiny):
    from fleettune.shared import corpora

    tokenizer = models.load_tokenizer("tiny")
    data = trainer.blocks(tokenizer(corpora.train_text("legal", 40_000))["input_ids"], 64)
    for mode, returns in (("two_part", "residual"), ("u_shaped", "residual"), ("u_shaped", "correction")):
        model = trainer.peft_model(models.load_model("tiny"), AdapterConfig(rank=4, alpha=8))
        config = SplitConfig(mode=mode, cut=1, top_layers=1, clip=1e4, seq_len=64, server_lr=3e-3,
                             server_returns=returns)
        device = SplitDevice(LocalTransport(SplitServer(model, config)), model, data, config, lr=3e-3, batch=8)
        losses = [loss for loss in (device.step() for _ in range(40)) if loss is not None]
        assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.3, (mode, losses[:8], losses[-8:])


def test_with_the_servers_correction_noise_at_the_cut_cannot_make_the_start_worse_than_the_base():
    """The server's LoRA starts at zero, so its correction is exactly zero whatever noise it
    received, and the device's frozen layers compute the base model: held-out perplexity through
    the split at sigma 2 (epsilon far below 1) is the base model's own."""
    from fleettune.shared import corpora

    tokenizer = models.load_tokenizer("tiny")
    data = trainer.blocks(tokenizer(corpora.heldout_text("legal", 6_000))["input_ids"], 64)
    model = trainer.peft_model(models.load_model("tiny"), AdapterConfig(rank=4, alpha=8))
    base = trainer.perplexity(model, data)
    for returns in ("correction", "residual"):
        config = SplitConfig(cut=1, top_layers=1, clip=10.0, sigma=2.0, seq_len=64, bottleneck=16,
                             server_returns=returns)
        server = SplitServer(model, config)
        device = SplitDevice(LocalTransport(server), model, data, config, lr=1e-3)
        through = device.perplexity(server, data)
        if returns == "correction":
            assert through == pytest.approx(base, rel=1e-4)
        else:  # what the base layers add to noised features replaces what they add to clean ones
            assert through > 1.01 * base


def test_a_correction_needs_the_u_shaped_mode():
    with pytest.raises(ValueError, match="U-shaped"):
        SplitConfig(mode="two_part", server_returns="correction")
    with pytest.raises(ValueError, match="top_layers >= 1"):
        SplitConfig(top_layers=0, server_returns="correction")
    with pytest.raises(ValueError, match="server_returns"):
        SplitConfig(server_returns="everything")
