"""One device: check in, fetch the global adapter, train on local data, upload the delta, submit it.

Everything goes through the gateway (`fleettune.DeviceClient`): the device holds its token and the
URLs it is handed, never broker or storage credentials.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from fleettune.shared.protocol.adapter_spec import AdapterConfig, build_spec
from fleettune.shared.device import trainer
from fleettune.shared.federation import FederationConfig, LocalTraining
from fleettune.shared.protocol import versions
from fleettune.shared.protocol.compression import Compressor
from fleettune.shared.protocol.safetensors_reader import parse
from fleettune.device import DeviceClient, FleettuneAPIError
from fleettune.shared.secagg.participant import Participant, flatten, new_identity
from fleettune.shared.strategies.config import CONTROL_PREFIX


@dataclasses.dataclass(frozen=True)
class RoundReport:
    device: str
    round: int
    base_version: int
    samples: int
    steps: int
    loss: float
    train_seconds: float
    fetch_seconds: float  # check in, download and load the global adapter
    send_seconds: float  # delta + encode + upload + submit: what sending an update costs the device
    receipt: str = ""


@dataclasses.dataclass(frozen=True)
class Fetched:
    """What a check-in brought a device: its plan and the global weights it trains from."""

    plan: dict
    weights: dict[str, torch.Tensor]
    sent_keys: list[str]
    ffa: bool
    server_c: dict[str, torch.Tensor] | None
    seconds: float  # check in, download and parse


class Device:
    """Holds one PEFT model over a frozen base, and the device's private training sequences."""

    def __init__(self, device_id: str, config: FederationConfig, model, data: torch.Tensor,
                 strategy: LocalTraining, max_header_bytes: int = 1 << 20, ram_mb: int | None = None,
                 storage_mb: int | None = None, tier: str = "default"):
        self.device_id = device_id
        self.config = config
        self.model = model  # a PeftModel whose adapter matches config.adapter
        self.data = data
        self.strategy = strategy
        self.max_header_bytes = max_header_bytes
        self.ram_mb, self.storage_mb, self.tier = ram_mb, storage_mb, tier
        self.control: dict[str, torch.Tensor] = {}  # SCAFFOLD's c_i: device state that never leaves it
        self.compressor = Compressor()  # its error-feedback residual never leaves the device either
        self.identity: bytes | None = None  # Ed25519 identity for secure aggregation, made on first need
        self.secure: Participant | None = None  # its part in a secure round still under way

    def _server_control(self, gateway: DeviceClient, plan: dict, shapes: dict[str, tuple[int, ...]]
                        ) -> dict[str, torch.Tensor]:
        """SCAFFOLD's server control variate for this round: zero until a SCAFFOLD round published one."""
        try:
            return parse(gateway.download(plan, versions.CONTROL_FILE), shapes, self.max_header_bytes)
        except FleettuneAPIError as exc:
            if exc.status != 404:
                raise
            return {k: torch.zeros(s) for k, s in shapes.items()}

    def run_round(self, gateway: DeviceClient, seed: int = 0, wait_secure: bool = True) -> RoundReport:
        """Check in, fetch, train and send: one device's whole round. In a secure round the update
        goes up masked through the stages; `wait_secure` False leaves them to `self.secure.step`
        (a process driving many devices interleaves them)."""
        return self.train_and_send(gateway, self.fetch(gateway), seed, wait_secure)

    def fetch(self, gateway: DeviceClient) -> Fetched:
        """Check in and download the global adapter (and SCAFFOLD's control) it names; no training.

        Apart from training so a device can hold a version while others publish newer ones (async
        rounds): the weights stay here, not in the shared model, until it trains."""
        started = time.perf_counter()
        plan = gateway.check_in(self.ram_mb, self.storage_mb, self.tier)
        adapter = dict(plan["adapter"], target_modules=tuple(plan["adapter"]["target_modules"]))
        tensors = build_spec(self.config.model, AdapterConfig(**adapter)).tensors  # its tier's rank, if any
        own = {k: tuple(v.shape) for k, v in trainer.adapter_weights(self.model).items()}
        if tensors != own:
            raise ValueError(f"round {plan['round']} trains adapter {adapter}; this device's model has another "
                             "layout: rebuild it")
        global_weights = parse(gateway.download(plan), tensors, self.max_header_bytes)
        ffa = plan.get("lora_aggregation") == "ffa"  # FFA-LoRA: A stays frozen and is not sent
        sent_keys = [k for k in tensors if not (ffa and k.endswith("lora_A.weight"))]
        server_c = self._server_control(gateway, plan, {k: tensors[k] for k in sent_keys}) \
            if plan.get("drift_control") == "scaffold" else None
        return Fetched(plan, global_weights, sent_keys, ffa, server_c, time.perf_counter() - started)

    def train_and_send(self, gateway: DeviceClient, fetched: Fetched, seed: int = 0,
                       wait_secure: bool = True) -> RoundReport:
        """Train from what `fetch` brought, upload the delta and submit it."""
        plan, global_weights, sent_keys, server_c = fetched.plan, fetched.weights, fetched.sent_keys, fetched.server_c
        trainer.load_adapter_weights(self.model, global_weights)
        # the round's own training config: a change through the API reaches devices at the next round
        strategy = LocalTraining(**plan["training"]) if "training" in plan else self.strategy
        correction = {k: server_c[k] - self.control.get(k, 0.0) for k in sent_keys} if server_c else None
        result = trainer.train(self.model, self.data, strategy, seed=seed, freeze_lora_a=fetched.ffa,
                               correction=correction)

        sent = time.perf_counter()
        after = trainer.adapter_weights(self.model)
        delta = {k: (after[k] - global_weights[k].float()).numpy() for k in sent_keys}
        if server_c is not None:  # c_i <- its mean gradient this round (kept on the device); Δc_i goes up
            fresh = result.mean_gradients
            for k in sent_keys:
                delta[CONTROL_PREFIX + k] = (fresh[k] - self.control.get(k, torch.zeros_like(fresh[k]))).numpy()
            self.control = fresh
        if "secure_aggregation" in plan:
            self._join_secure(gateway, plan, delta, result.samples, seed, wait_secure)
            receipt = {"receipt": ""}  # the update has no receipt of its own: only the cohort's sum exists
        else:
            if (strategy.update_encoding, strategy.update_density) != (self.compressor.encoding, self.compressor.density):
                self.compressor = Compressor(strategy.update_encoding, strategy.update_density, seed=seed)
            receipt = gateway.send(plan, self.compressor.encode(delta), num_samples=result.samples,
                                   train_seconds=result.seconds, metrics={"loss": result.loss, "steps": result.steps})
        done = time.perf_counter()
        return RoundReport(self.device_id, plan["round"], plan["base_version"], result.samples, result.steps,
                           result.loss, result.seconds, fetched.seconds, done - sent, receipt["receipt"])

    def _join_secure(self, gateway: DeviceClient, plan: dict, delta: dict, samples: int, seed: int,
                     wait: bool) -> None:
        """The clipped, weighted update enters the round's SecAgg+ stages (see shared.secagg)."""
        secure = plan["secure_aggregation"]
        if self.identity is None:
            self.identity, public = new_identity()
            gateway.register_identity(public)
        x = flatten(delta, secure["tensors"], float(secure["clip"]))
        weight = max(1, min(int(samples), int(secure["max_weight"])))
        self.secure = Participant(self.device_id, self.identity, gateway.federation, plan, x, weight,
                                  np.random.default_rng(seed))
        if wait:
            self.secure.run(gateway)
