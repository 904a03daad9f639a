"""A simulated fleet of real devices: non-IID data from the packaged corpora, one shared base model.

Simulated devices take turns on one PeftModel: every round starts by loading the global adapter,
so sharing the frozen base costs nothing in correctness and saves a model copy per device.
"""

from __future__ import annotations

import dataclasses

import torch

from fleettune.shared import corpora
from fleettune.shared.device import trainer
from fleettune.shared.device.client import Device
from fleettune.shared.federation import FederationConfig


@dataclasses.dataclass(frozen=True)
class FleetSpec:
    devices_per_domain: dict[str, int]
    chars_per_device: int = 24_000
    seed: int = 0

    @classmethod
    def spread(cls, num_devices: int, chars_per_device: int = 24_000, seed: int = 0,
               domains: tuple[str, ...] = corpora.DOMAINS) -> FleetSpec:
        """num_devices spread round-robin over the fine-tuning domains."""
        counts = {d: 0 for d in domains}
        for i in range(num_devices):
            counts[domains[i % len(domains)]] += 1
        return cls(counts, chars_per_device, seed)


def build_fleet(spec: FleetSpec, config: FederationConfig, model, tokenizer, ram_mb: int | None = None,
                storage_mb: int | None = None) -> list[tuple[Device, str]]:
    """(Device, domain) for every partition, all sharing `model`; a device's tier is its domain."""
    fleet = []
    for client in corpora.partition(spec.devices_per_domain, spec.chars_per_device, spec.seed):
        data = trainer.blocks(tokenizer(client.text)["input_ids"], config.training.seq_len)
        fleet.append((Device(client.client, config, model, data, config.training, ram_mb=ram_mb,
                             storage_mb=storage_mb, tier=client.domain), client.domain))
    return fleet


def pooled(fleet: list[tuple[Device, str]]) -> torch.Tensor:
    """Everyone's sequences in one tensor: the centralized baseline's training set."""
    return torch.cat([device.data for device, _ in fleet])

