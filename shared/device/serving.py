"""A device that serves what its check-in says, measures it on its own held-out text, and reports it.

This is the device half of a canary rollout: the gateway decides the version (sticky per device),
the device downloads it by the presigned URL it was handed, evaluates the loss on text that never
leaves it, and reports that number through the gateway. Devices of one process share one model
and download each version once (the bytes are the same for all).
"""

from __future__ import annotations

import torch
from safetensors.torch import load

from fleettune.shared.device import trainer
from fleettune import DeviceClient


class ServingFleet:
    def __init__(self, model, clients: dict[str, DeviceClient], texts: dict[str, torch.Tensor]) -> None:
        self.model = model  # a PEFT model of the federation's adapter on its base
        self.clients = clients
        self.texts = texts  # device -> its held-out token block(s), shape (n, seq)
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.check_ins = 0

    def loss(self, device: str, serve: dict) -> float:
        version = serve["version"]
        if version not in self.weights:
            self.weights[version] = load(self.clients[device].download_served(serve))
        trainer.load_adapter_weights(self.model, self.weights[version])
        with torch.no_grad():
            return self.model(input_ids=self.texts[device], labels=self.texts[device]).loss.item()

    def visit(self, device: str) -> dict:
        """One check-in and one report; returns the gateway's answer to the report."""
        client = self.clients[device]
        serve = client.serving()
        self.check_ins += 1
        return client.report(serve["version"], eval_loss=self.loss(device, serve))

    def until_settled(self, passes: int = 40, on_change=None) -> dict:
        """Devices check in and report in turn until the live rollout completes or rolls back.

        `passes` bounds the wait, not the gates: arms are hashed from a random rollout id, and
        with some draws the sequential tests need more looks (suite runs timed out after 8 passes,
        960 check-ins, and after 20, 2,400, on the canary demo's good version)."""
        last = None
        for _ in range(passes):
            for device in self.clients:
                out = self.visit(device)
                state = (out["rollout_status"], out["percent"])
                if state != last and on_change is not None:
                    on_change(out, self.check_ins)
                last = state
                if out["rollout_status"] in ("completed", "rolled_back"):
                    return out
        raise TimeoutError(f"the rollout did not settle in {self.check_ins} check-ins")
