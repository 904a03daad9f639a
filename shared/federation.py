"""A federation: the base model it adapts, its adapter config and its round policy."""

from __future__ import annotations

import dataclasses
import functools
import json
import math

from shared import keys
from shared.adapter_spec import AdapterConfig, AdapterSpec, ModelDims, build_spec
from shared.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class RoundPolicy:
    """How rounds open, close and combine updates."""

    min_updates: int = 2  # quorum: fewer accepted updates than this at the deadline fails the round
    timeout_seconds: float = 600.0
    min_samples_per_client: int = 1
    max_rounds: int = 10
    max_grad_norm: float | None = 1.0  # L2 bound over a whole update; None disables clipping
    server_lr: float = 1.0
    max_num_samples: int = 100_000  # the most a device may claim; larger claims are capped to this

    def __post_init__(self) -> None:
        checks = {
            "min_updates must be >= 1": self.min_updates >= 1,
            "timeout_seconds must be > 0": self.timeout_seconds > 0,
            "min_samples_per_client must be >= 1": self.min_samples_per_client >= 1,
            "max_rounds must be >= 1": self.max_rounds >= 1,
            "max_grad_norm must be > 0 or None": self.max_grad_norm is None
            or (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)),
            "server_lr must be > 0": self.server_lr > 0 and math.isfinite(self.server_lr),
            "max_num_samples must be >= min_samples_per_client": self.max_num_samples >= self.min_samples_per_client,
        }
        failed = [message for message, ok in checks.items() if not ok]
        if failed:
            raise ConfigError("; ".join(failed))


@dataclasses.dataclass(frozen=True)
class FederationConfig:
    name: str
    model: ModelDims
    adapter: AdapterConfig = AdapterConfig()
    policy: RoundPolicy = RoundPolicy()
    base_model: str = "tiny-llama"
    seed: int = 0

    def __post_init__(self) -> None:
        if not keys.valid_id(self.name):
            raise ConfigError(f"federation name {self.name!r} must match [A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}")

    @functools.cached_property
    def spec(self) -> AdapterSpec:
        return build_spec(self.model, self.adapter, self.base_model)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> FederationConfig:
        raw = json.loads(text)
        adapter = dict(raw["adapter"], target_modules=tuple(raw["adapter"]["target_modules"]))
        return cls(
            name=raw["name"], model=ModelDims(**raw["model"]), adapter=AdapterConfig(**adapter),
            policy=RoundPolicy(**raw["policy"]), base_model=raw["base_model"], seed=raw["seed"],
        )
