"""One device: fetch the global adapter, train on local data, upload the delta, enqueue the envelope."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from shared import versions
from shared.device import trainer
from shared.federation import FederationConfig, TrainingStrategy
from shared.storage import ObjectStore
from shared.submit import encode_update, submit_update


@dataclasses.dataclass(frozen=True)
class RoundReport:
    device: str
    round: int
    base_version: int
    samples: int
    steps: int
    loss: float
    train_seconds: float
    fetch_seconds: float  # download and load the global adapter
    send_seconds: float  # delta + encode + upload + enqueue: what sending an update costs the device


class Device:
    """Holds one PEFT model over a frozen base, and the device's private training sequences."""

    def __init__(self, device_id: str, config: FederationConfig, model, data: torch.Tensor,
                 strategy: TrainingStrategy, max_update_bytes: int = 64 << 20, max_header_bytes: int = 1 << 20):
        self.device_id = device_id
        self.config = config
        self.model = model  # a PeftModel whose adapter matches config.adapter
        self.data = data
        self.strategy = strategy
        self.max_update_bytes = max_update_bytes
        self.max_header_bytes = max_header_bytes

    def run_round(self, store: ObjectStore, enqueue: Callable[[bytes], None], round_no: int, base_version: int,
                  seed: int = 0) -> RoundReport:
        started = time.perf_counter()
        global_weights = versions.load_weights(store, self.config.name, base_version, self.config.spec,
                                               self.max_update_bytes, self.max_header_bytes)
        trainer.load_adapter_weights(self.model, global_weights)
        fetched = time.perf_counter()

        result = trainer.train(self.model, self.data, self.strategy, seed=seed)

        sent = time.perf_counter()
        after = trainer.adapter_weights(self.model)
        delta = {k: (after[k] - global_weights[k].float()).numpy() for k in self.config.spec.tensors}
        submit_update(store, enqueue, federation=self.config.name, round_no=round_no, device=self.device_id,
                      blob=encode_update(delta), base_version=base_version, num_samples=result.samples,
                      train_seconds=result.seconds, metrics={"loss": result.loss, "steps": result.steps})
        done = time.perf_counter()
        return RoundReport(self.device_id, round_no, base_version, result.samples, result.steps, result.loss,
                           result.seconds, fetched - started, done - sent)
