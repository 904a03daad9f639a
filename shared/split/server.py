"""The server's part of a split federation: its layers' LoRA, trained one device batch at a time.

Steps are serialized (one model, one optimizer). A two-part step is one call: forward, loss,
backward, optimizer step, and the gradient at the cut goes back. A U-shaped step is two calls: the
forward keeps its graph under a step id until the device sends the gradient at the top of the
server's layers; only then does the optimizer step. A device that never comes back (it
disconnected mid-batch) leaves a pending forward that expires after `pending_ttl_s` without
touching the weights, and each device has at most one pending forward, so state stays whole.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from collections.abc import Callable

import torch

from fleettune.shared.errors import Refusal, RejectReason, Rejected
from fleettune.shared.split import bottleneck
from fleettune.shared.split import model as split_model
from fleettune.shared.split.config import SplitConfig

MAX_PENDING = 1024


@dataclasses.dataclass
class _Pending:
    device: str
    inputs: torch.Tensor  # the leaf the device's activations became
    outputs: torch.Tensor  # the server layers' output, with its graph
    at: float


class SplitServer:
    def __init__(self, peft_model, config: SplitConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.model = peft_model
        self.config = config
        self.clock = clock
        self.layers = config.server_layers(split_model.num_layers(peft_model))
        self.hidden = peft_model.config.hidden_size
        self.vocab = peft_model.config.vocab_size
        self.width = config.width(self.hidden)  # features per token on the wire
        self.lift = bottleneck.lift(bottleneck.projection(peft_model, config.bottleneck),
                                    config.denoise_gain(self.hidden))
        self.params = split_model.trainable(peft_model, self.layers) + (
            list(self.lift.parameters()) if self.lift is not None else [])
        self.optimizer = torch.optim.AdamW(self.params, lr=config.server_lr)
        self.pending: dict[str, _Pending] = {}
        self.lock = threading.Lock()
        self.steps = 0
        self.model.train()

    # --- message shapes: from the config and the model, never from the message -------------------

    def shapes(self, batch: int, with_labels: bool) -> dict[str, tuple[int, ...]]:
        if not 1 <= batch <= self.config.max_batch:
            raise Refusal(413, "batch_too_large", f"batch {batch} is not in [1, {self.config.max_batch}]")
        shapes = {"activations": (batch, self.config.seq_len, self.width)}
        if with_labels:
            shapes["labels"] = (batch, self.config.seq_len)
        return shapes

    def grad_shape(self, step_id: str) -> dict[str, tuple[int, ...]]:
        pending = self.pending.get(step_id)
        if pending is None:
            raise Refusal(409, "unknown_step", "no pending forward with this step id (expired or finished)")
        return {"grad": tuple(pending.outputs.shape)}

    def admit(self, activations: torch.Tensor) -> None:
        """Refuse a batch whose example is larger than the clip plus its noise allow: that device
        skipped its clip, and its activations would leave it with less privacy than promised."""
        norms = activations.flatten(1).norm(dim=1)
        bound = self.config.max_norm(self.hidden)
        if bool((norms > bound).any()):
            raise Rejected(RejectReason.NORM_ABOVE_BOUND,
                           f"an example's norm {float(norms.max()):.4g} exceeds {bound:.4g} (clip and noise)")

    # --- steps -------------------------------------------------------------------------------------

    def two_part(self, activations: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The rest of the model and the loss; returns (gradient at the cut, loss) after one step."""
        if self.config.mode != "two_part":
            raise Refusal(409, "wrong_mode", "this federation splits U-shaped: forward, then backward")
        with self.lock:
            inputs = activations.detach().requires_grad_(True)
            out = split_model.server_part(self.model, inputs, self.layers, self.lift, residual=False)
            loss = split_model.head_loss(self.model, out, labels)
            self._step(loss.backward)
            return inputs.grad, loss.item()

    def forward(self, device: str, activations: torch.Tensor) -> tuple[str, torch.Tensor]:
        """U-shaped, first half: the server's layers; what they add to the residual stream (or what
        their LoRA changes) goes back for the device to add to its own activations; the graph stays."""
        if self.config.mode != "u_shaped":
            raise Refusal(409, "wrong_mode", "this federation splits in two parts: send activations and labels")
        with self.lock:
            self._expire()
            for step_id in [s for s, p in self.pending.items() if p.device == device]:
                del self.pending[step_id]  # a device has one batch in flight: a new one supersedes it
            if len(self.pending) >= MAX_PENDING:
                raise Refusal(503, "split_busy", "too many forwards wait for their backward", {"Retry-After": "1"})
            inputs = activations.detach().requires_grad_(True)
            outputs = self._u_shaped(inputs)
            step_id = secrets.token_hex(8)
            self.pending[step_id] = _Pending(device, inputs, outputs, self.clock())
            return step_id, outputs.detach()

    def backward(self, device: str, step_id: str, grad: torch.Tensor) -> torch.Tensor:
        """U-shaped, second half: the gradient at the server's top in, the gradient at the cut out."""
        with self.lock:
            self._expire()
            pending = self.pending.get(step_id)
            if pending is None or pending.device != device:
                raise Refusal(409, "unknown_step", "no pending forward of this device with this step id")
            del self.pending[step_id]
            self._step(lambda: pending.outputs.backward(grad))
            return pending.inputs.grad

    @torch.no_grad()
    def infer(self, activations: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """No step, no state: U-shaped, the residual the server's layers add; two-part, the loss on
        `labels`. For held-out evaluation through the split (shared/split/device.py)."""
        was = self.model.training
        self.model.eval()
        try:
            with self.lock:
                if self.config.mode == "u_shaped":
                    return self._u_shaped(activations)
                out = split_model.server_part(self.model, activations, self.layers, self.lift, False)
                return split_model.head_loss(self.model, out, labels)
        finally:
            self.model.train(was)

    def _u_shaped(self, inputs: torch.Tensor) -> torch.Tensor:
        """What a U-shaped forward returns: the residual the server's layers add, or their LoRA's
        correction (config.server_returns)."""
        if self.config.server_returns == "correction":
            return split_model.server_correction(self.model, inputs, self.layers, self.lift)
        return split_model.server_part(self.model, inputs, self.layers, self.lift, residual=True)

    def _step(self, backward: Callable[[], None]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.steps += 1

    def _expire(self) -> None:
        cutoff = self.clock() - self.config.pending_ttl_s
        for step_id in [s for s, p in self.pending.items() if p.at < cutoff]:
            del self.pending[step_id]

    # --- the server part as an adapter -------------------------------------------------------------

    def weights(self) -> dict[str, torch.Tensor]:
        """The LoRA tensors of the server's layers, under PEFT's saved names."""
        from fleettune.shared.device import trainer

        return {k: v for k, v in trainer.adapter_weights(self.model).items()
                if split_model.layer_of(k) in self.layers}

    def lift_weights(self) -> dict[str, torch.Tensor]:
        """The bottleneck's learned lift (none without a bottleneck), published beside the adapter."""
        return {f"lift.{k}": v.detach() for k, v in self.lift.state_dict().items()} if self.lift is not None else {}

    def load_lift(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.lift is not None and tensors:
            self.lift.load_state_dict({k.removeprefix("lift."): v for k, v in tensors.items()})
