"""A device's side of split learning: its layers forward, DP at the cut, the server's gradient back.

Each step Poisson-samples the device's sequences (each with probability q, the config's sample_rate
or batch / n, which the accountant counts on), runs the embeddings and layers [0, k), projects each
token onto the bottleneck's r directions if the config has one, clips each example to C and adds
N(0, (sigma C)^2) noise before anything leaves the device, and backpropagates the gradient the
server returns through the clip into its own LoRA. U-shaped, it adds what the server's layers
contribute to its own, un-noised activations, then runs the top layers, the head and the loss, so
labels never leave it and the noise reaches the model only through the server's contribution.

Between rounds the device's part of the adapter goes through the ordinary round pipeline
(SplitFed): the update carries its layers' delta and zeros for the server's, so FedAvg averages
device parts only.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from safetensors.torch import load

from fleettune.shared.device import trainer
from fleettune.shared.split import bottleneck
from fleettune.shared.split import model as split_model
from fleettune.shared.split import wire
from fleettune.shared.split.config import SplitConfig
from fleettune.shared.strategies import privacy


class Transport(Protocol):
    def two_part(self, activations: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]: ...

    def forward(self, activations: torch.Tensor) -> tuple[str, torch.Tensor]: ...

    def backward(self, step_id: str, grad: torch.Tensor) -> torch.Tensor: ...


class LocalTransport:
    """The server object called in-process, without HTTP: the same steps (benchmarks, tests)."""

    def __init__(self, server, device: str = "local") -> None:
        self.server = server  # a shared.split.server.SplitServer
        self.device = device

    def two_part(self, activations, labels):
        return self.server.two_part(activations, labels)

    def forward(self, activations):
        return self.server.forward(self.device, activations)

    def backward(self, step_id, grad):
        return self.server.backward(self.device, step_id, grad)


class HttpTransport:
    """Through the gateway, with the device's token; safetensors both ways. Counts bytes moved."""

    def __init__(self, gateway, hidden: int) -> None:
        self.gateway = gateway  # a fleettune.DeviceClient
        self.hidden = hidden
        self.sent = self.received = 0

    def _post(self, suffix: str, tensors: dict, params: dict) -> tuple[dict, dict]:
        blob = wire.encode(tensors)
        body, headers = self.gateway.split_post(suffix, blob, params)
        self.sent, self.received = self.sent + len(blob), self.received + len(body)
        return load(body), headers  # the server's answer: trusted, and bounded by split_post

    def two_part(self, activations, labels):
        out, headers = self._post("step", {"activations": activations, "labels": labels},
                                  {"batch": len(activations)})
        return out["grad"], float(headers["x-loss"])

    def forward(self, activations):
        out, headers = self._post("forward", {"activations": activations}, {"batch": len(activations)})
        return headers["x-step"], out["residual"]

    def backward(self, step_id, grad):
        out, _ = self._post("backward", {"grad": grad}, {"step": step_id})
        return out["grad"]


class SplitDevice:
    def __init__(self, transport: Transport, peft_model, data: torch.Tensor, config: SplitConfig, lr: float,
                 seed: int = 0, batch: int = 8) -> None:
        self.transport = transport
        self.model = peft_model
        self.data = data  # (n, seq_len) token ids: never leaves the device
        self.config = config
        num_layers = split_model.num_layers(peft_model)
        self.device_layers = config.device_layers(num_layers)
        self.middle = config.server_layers(num_layers)
        self.top = range(self.middle.stop, num_layers)
        # with the server's correction, the layers below the cut stay frozen: the gradient the server
        # returns is taken at what it received (noised, through the bottleneck), not at the device's
        # clean activations, and it would move them where the loss does not ask
        trained = self.top if config.server_returns == "correction" else self.device_layers
        self.params = split_model.trainable(peft_model, trained)
        self.optimizer = torch.optim.AdamW(self.params, lr=lr)
        self.projection = bottleneck.projection(peft_model, config.bottleneck)
        self.rate = config.sample_rate or min(1.0, batch / len(data))
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0
        self.bytes_per_step: list[int] = []

    def _sample(self) -> torch.Tensor:
        picked = torch.nonzero(torch.rand(len(self.data), generator=self.generator) < self.rate).flatten()
        return self.data[picked[: self.config.max_batch]]  # the cap binds with probability ~0 at these rates

    def step(self) -> float | None:
        """One batch through both sides; the loss (None for an empty Poisson draw, which is a step)."""
        batch = self._sample()
        self.steps += 1  # the accountant counts every draw, empty or not
        if len(batch) == 0:
            return None
        self.model.train()
        # with the server's correction nothing trains below the cut: no graph to keep there
        with torch.set_grad_enabled(self.config.server_returns == "residual"):
            hidden, sent = self._message(batch, self.generator)
        if self.config.mode == "two_part":
            grad, loss = self.transport.two_part(sent.detach(), batch)
        else:
            step_id, residual = self.transport.forward(sent.detach())
            residual = residual.detach().requires_grad_(True)
            out = split_model.head_loss(self.model, split_model.run_layers(self.model, self._stream(hidden, residual),
                                                                           self.top), batch)
            out.backward(retain_graph=True)  # into the layers below the cut through the residual stream too
            grad, loss = self.transport.backward(step_id, residual.grad), out.item()
        if self.config.server_returns == "residual":
            sent.backward(grad)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def _stream(self, hidden: torch.Tensor, returned: torch.Tensor) -> torch.Tensor:
        """U-shaped: the residual stream at the top layers, from the device's clean activations at
        the cut and what the server returned (its residual, or its LoRA's correction to the frozen
        base of its layers, which the device then runs itself, forward only)."""
        if self.config.server_returns == "correction":
            return split_model.frozen_layers(self.model, hidden, self.middle) + returned
        return hidden + returned

    def _message(self, batch: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
        return split_model.device_message(self.model, batch, self.config.cut, self.projection, self.config.clip,
                                          self.config.sigma, generator)

    @torch.no_grad()
    def perplexity(self, server, data: torch.Tensor, seed: int = 0, batch_size: int = 8) -> float:
        """Held-out perplexity through the split as it runs: this device's layers, DP at the cut with
        fresh noise, the server's layers (`server`: a SplitServer, called in-process), the rest."""
        was = self.model.training
        self.model.eval()
        generator = torch.Generator().manual_seed(seed)
        nll, tokens = 0.0, 0
        try:
            for i in range(0, len(data), batch_size):
                batch = data[i:i + batch_size]
                hidden, sent = self._message(batch, generator)
                if self.config.mode == "two_part":
                    loss = server.infer(sent, batch)
                else:
                    top = split_model.run_layers(self.model, self._stream(hidden, server.infer(sent)), self.top)
                    loss = split_model.head_loss(self.model, top, batch)
                n = batch.numel() - len(batch)
                nll, tokens = nll + loss.item() * n, tokens + n
        finally:
            self.model.train(was)
        return math.exp(nll / tokens)

    def epsilon(self) -> float:
        """This device's (epsilon, delta)-DP for the examples it holds, over the steps it took."""
        if self.config.sigma == 0:
            return math.inf
        return privacy.epsilon(self.config.sigma, self.rate, self.steps, self.config.delta)

    def part_delta(self, start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The round's update: this device's layers moved from `start`, zeros for the server's."""
        now = trainer.adapter_weights(self.model)
        return {k: (now[k] - v) if split_model.layer_of(k) in self.device_layers else torch.zeros_like(v)
                for k, v in start.items()}


def combined(device_part: dict[str, torch.Tensor], server_part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The whole adapter: the server's layers from its own version, every other layer the devices'."""
    return {k: server_part.get(k, v) for k, v in device_part.items()}


def split_round(gateway, device: SplitDevice, steps: int, shapes: dict[str, tuple[int, ...]],
                plan: dict | None = None, max_header_bytes: int = 1 << 20) -> dict:
    """One SplitFed round: start from the global version, take `steps` split steps through the
    split server, and send this device's part through the round pipeline. Returns the receipt."""
    from fleettune.shared.protocol.safetensors_reader import parse
    from fleettune.shared.protocol.updates import encode_update

    plan = plan or gateway.check_in()
    start = {k: v.clone() for k, v in parse(gateway.download(plan), shapes, max_header_bytes).items()}
    trainer.load_adapter_weights(device.model, start)
    losses = [loss for loss in (device.step() for _ in range(steps)) if loss is not None]
    delta = {k: v.numpy() for k, v in device.part_delta(start).items()}
    samples = max(1, round(device.rate * len(device.data) * steps))  # expected sequences seen
    receipt = gateway.send(plan, encode_update(delta), num_samples=samples,
                           metrics={"loss": sum(losses) / max(len(losses), 1), "epsilon": min(device.epsilon(), 1e9)})
    return receipt
