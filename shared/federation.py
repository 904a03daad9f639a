"""A federation: the base model it adapts, its adapter config and its round policy."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Annotated, Literal, get_args

from pydantic import AliasChoices, ConfigDict, Field, TypeAdapter, ValidationError, with_config

from fleettune.shared import corpora, keys
from fleettune.shared.protocol.adapter_spec import AdapterConfig, AdapterSpec, ModelDims, build_spec
from fleettune.shared.protocol.runtimes import FORMATS
from fleettune.shared.errors import ConfigError
from fleettune.shared.strategies.config import CONTROL_PREFIX, AggregationConfig

# Stored configs are read back by pydantic (FederationConfig.from_json): a key no field takes is an
# error, not dropped, so a config written by a newer version is never rewritten without it.
_STORED = ConfigDict(extra="forbid")
# RoundPolicy.max_update_norm, under the name configs stored before it took the API's name had
_MAX_UPDATE_NORM = Field(validation_alias=AliasChoices("max_update_norm", "max_grad_norm"))

LocalOptimizer = Literal["adamw", "sgd"]
LrSchedule = Literal["constant", "cosine"]
# how devices code their updates (shared/protocol/compression.py; the server reads any of them)
UpdateEncoding = Literal["float32", "float16", "bfloat16", "int8", "int4", "int2", "topk"]
RoundMode = Literal["sync", "async"]
ForgettingAction = Literal["halt", "lower_lr", "interpolate"]


@with_config(_STORED)
@dataclasses.dataclass(frozen=True)
class RoundPolicy:
    """How rounds open, close and combine updates.

    `mode` "sync": a round waits for its cohort (or its deadline) and takes only updates trained
    from its base version. "async" (FedBuff, Nguyen et al. 2022): a round is a buffer. Devices train
    from the newest version whenever they can; each accepted update joins the open buffer, scaled by
    its staleness weight (1 + tau)^-staleness_exponent (tau: versions published since its base), and
    the buffer publishes after `buffer_size` updates, or after `timeout_seconds` if it holds at least
    `min_updates` (with fewer it keeps waiting: a buffer never fails and drops what it holds).
    With `participation_weighting`, an update also weighs the versions published since the
    device's previous update joined a buffer (FedAU, Wang & Ji 2024), at most max_staleness + 1:
    a fast device's many updates and a slow device's few then weigh the same over time, so the
    model does not drift to the fast devices' data.
    """

    min_updates: int = 2  # quorum: fewer accepted updates than this at the deadline fails the round
    timeout_seconds: float = 600.0  # a round's deadline; in async mode the most a buffer waits to publish
    min_samples_per_client: int = 1
    max_rounds: int = 10
    # the server's L2 bound over a whole update; None disables clipping (not max_grad_norm: that
    # is the device's per-step clip, LocalTraining.max_grad_norm, as PEFT and torch call it)
    max_update_norm: Annotated[float | None, _MAX_UPDATE_NORM] = 1.0
    server_lr: float = 1.0
    max_num_samples: int = 100_000  # the most a device may claim; larger claims are capped to this
    clients_per_round: int = 0  # 0: every enrolled device; else the server picks this many per round
    mode: RoundMode = "sync"
    buffer_size: int = 4  # async: publish after this many accepted updates (FedBuff's K)
    max_staleness: int = 8  # async: updates trained from a version more than this many versions old are refused
    staleness_exponent: float = 0.5  # async: a in the staleness weight (1 + tau)^-a (FedBuff's polynomial)
    participation_weighting: bool = True  # async: weigh an update by the versions since the device's last one

    def participation_weight(self, interval: int) -> int:
        """FedAU's weight: the versions since the device's previous update joined a buffer (its
        participation interval), from 1 to max_staleness + 1; 1 without participation_weighting."""
        return min(max(interval, 1), self.max_staleness + 1) if self.participation_weighting else 1

    def staleness_weight(self, staleness: int) -> float:
        """FedBuff's polynomial staleness weight s(tau) = (1 + tau)^-a, in (0, 1]."""
        return (1.0 + staleness) ** -self.staleness_exponent

    def __post_init__(self) -> None:
        checks = {
            "mode must be 'sync' or 'async'": self.mode in get_args(RoundMode),
            "buffer_size must be >= 1, and >= min_updates in async mode": self.buffer_size >= 1 and (
                self.mode == "sync" or self.buffer_size >= self.min_updates),
            "max_staleness must be >= 0": self.max_staleness >= 0,
            "staleness_exponent must be >= 0": self.staleness_exponent >= 0 and math.isfinite(self.staleness_exponent),
            "async rounds take every enrolled device: clients_per_round must be 0": self.mode == "sync"
            or self.clients_per_round == 0,
            "participation_weighting must be true or false": isinstance(self.participation_weighting, bool),
            "min_updates must be >= 1": self.min_updates >= 1,
            "timeout_seconds must be > 0": self.timeout_seconds > 0,
            "min_samples_per_client must be >= 1": self.min_samples_per_client >= 1,
            "max_rounds must be >= 1": self.max_rounds >= 1,
            "max_update_norm must be > 0 or None": self.max_update_norm is None
            or (self.max_update_norm > 0 and math.isfinite(self.max_update_norm)),
            "server_lr must be > 0": self.server_lr > 0 and math.isfinite(self.server_lr),
            "max_num_samples must be >= min_samples_per_client": self.max_num_samples >= self.min_samples_per_client,
            "clients_per_round must be 0 (all) or >= min_updates": self.clients_per_round == 0
            or self.clients_per_round >= self.min_updates,
        }
        failed = [message for message, ok in checks.items() if not ok]
        if failed:
            raise ConfigError("; ".join(failed))


@with_config(_STORED)
@dataclasses.dataclass(frozen=True)
class LocalTraining:
    """How each device trains in a round: its optimizer, epochs, batch, per-step clip, FedProx and
    SCAFFOLD terms (the aggregation strategy is `AggregationConfig`)."""

    learning_rate: float = 3e-3
    local_epochs: int = 1
    max_grad_norm: float = 1.0  # per-step gradient clipping on the device (RoundPolicy.max_update_norm: the server's)
    weight_decay: float = 0.0
    batch_size: int = 8
    seq_len: int = 128
    max_steps: int = 0  # 0: no cap; otherwise at most this many steps per round (shorter rounds)
    proximal_mu: float = 0.0  # FedProx: the device adds mu/2 * ||w - w_global||^2 to its loss
    # the device's optimizer: "sgd" sends lr x the mean gradient, so an adaptive server optimizer
    # (FedAdam) sees true gradients (FedOpt's client SGD); AdamW's first steps send their signs
    local_optimizer: LocalOptimizer = "adamw"
    # compressed updates: the device codes its delta this way, keeping what the code lost for its
    # next update (error feedback); update_density is top-k's share of entries sent
    update_encoding: UpdateEncoding = "float32"
    update_density: float = 0.05
    # the devices' learning rate across rounds: "cosine" decays it from learning_rate towards
    # lr_floor x learning_rate by the policy's last round; the server sets each round's value in
    # the plan, so devices need no clock of their own
    lr_schedule: LrSchedule = "constant"
    lr_floor: float = 0.1

    def __post_init__(self) -> None:
        if not (self.learning_rate > 0 and self.local_epochs >= 1 and self.batch_size >= 1
                and self.seq_len >= 8 and self.max_grad_norm > 0 and self.weight_decay >= 0
                and self.proximal_mu >= 0 and self.local_optimizer in get_args(LocalOptimizer)
                and self.update_encoding in get_args(UpdateEncoding) and 0 < self.update_density <= 0.5
                and self.lr_schedule in get_args(LrSchedule) and 0 <= self.lr_floor <= 1):
            raise ValueError(f"invalid training strategy: {self}")

    def for_round(self, round_no: int, rounds: int) -> LocalTraining:
        """This round's training as the plan carries it: the schedule's learning rate for round
        `round_no` (1-based) of `rounds` (0: no horizon, the rate stays)."""
        if self.lr_schedule == "constant" or rounds <= 1:
            return self
        t = min(max(round_no - 1, 0), rounds - 1) / (rounds - 1)
        scale = self.lr_floor + (1 - self.lr_floor) * 0.5 * (1 + math.cos(math.pi * t))
        return dataclasses.replace(self, learning_rate=self.learning_rate * scale)


TrainingStrategy = LocalTraining  # its first name, kept for code written against it


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """What a device declares when it enrolls."""

    device: str
    ram_mb: int | None = None
    storage_mb: int | None = None
    tier: str = "default"
    os: str | None = None
    app_version: str | None = None
    region: str | None = None
    accelerator: str | None = None
    runtime: str | None = None  # onnxruntime | executorch | coreml | litert | torch (None: torch)
    runtime_base: str | None = None  # sha256 of the exported base it holds: served only the adapter


@with_config(_STORED)
@dataclasses.dataclass(frozen=True)
class DeviceFilter:
    """Devices that declare less RAM or storage than this, or sit outside `groups`, do not train."""

    min_ram_mb: int = 0
    min_storage_mb: int = 0
    groups: tuple[str, ...] = ()  # when set, only members of one of these device groups train

    def refusal(self, ram_mb: int | None, storage_mb: int | None) -> str | None:
        """Why a device with these capabilities is not eligible, or None when it is."""
        if self.min_ram_mb and (ram_mb is None or ram_mb < self.min_ram_mb):
            return f"ram_mb {ram_mb} is below the federation's min_ram_mb {self.min_ram_mb}"
        if self.min_storage_mb and (storage_mb is None or storage_mb < self.min_storage_mb):
            return f"storage_mb {storage_mb} is below the federation's min_storage_mb {self.min_storage_mb}"
        return None

    def admits(self, ram_mb: int | None, storage_mb: int | None) -> bool:
        return self.refusal(ram_mb, storage_mb) is None


@with_config(_STORED)
@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    base_model: str = "tiny"  # 'tiny', 'smollm2' or a local HF directory
    domains: tuple[str, ...] = corpora.DOMAINS
    eval_chars: int = 12_000  # held-out characters per domain
    seq_len: int = 128
    general_every: int = 1  # measure forgetting every N versions
    forgetting_threshold: float = 1.25  # general perplexity / base general perplexity
    # lower_lr and halt act after a version passed the bound; interpolate publishes each version
    # scaled toward the base (every B times the largest s <= 1 that keeps general text in bound)
    forgetting_action: ForgettingAction = "lower_lr"
    lr_factor: float = 0.5  # what lower_lr multiplies the server learning rate by
    min_server_lr: float = 0.05  # lower_lr never goes below this

    def __post_init__(self) -> None:
        if self.forgetting_action not in get_args(ForgettingAction):
            raise ValueError("forgetting_action must be 'halt', 'lower_lr' or 'interpolate'")
        if not (self.forgetting_threshold > 1.0 and 0 < self.lr_factor < 1 and self.general_every >= 1
                and self.min_server_lr > 0):
            raise ValueError(f"invalid evaluation config: {self}")


@with_config(_STORED)
@dataclasses.dataclass(frozen=True)
class FederationConfig:
    name: str
    model: ModelDims
    adapter: AdapterConfig = AdapterConfig()
    policy: RoundPolicy = RoundPolicy()
    base_model: str = "tiny-llama"
    seed: int = 0
    training: LocalTraining = LocalTraining()
    device_filter: DeviceFilter = DeviceFilter()
    evaluation: EvaluationConfig | None = None  # None: versions are published without evaluation
    revision: int = 0  # bumped by every change through the API; each round records the one it runs
    aggregation: AggregationConfig = AggregationConfig()
    exports: tuple[str, ...] = ()  # formats each published version is exported to (protocol/runtimes.py)

    def __post_init__(self) -> None:
        if not set(self.exports) <= set(FORMATS) or list(self.exports) != sorted(set(self.exports)):
            raise ConfigError(f"exports must be sorted, distinct names among {sorted(FORMATS)}")
        if not keys.valid_id(self.name):
            raise ConfigError(f"federation name {self.name!r} must match {keys.ID_PATTERN} "
                              f"(at most {keys.ID_MAX_LENGTH} characters)")
        if self.aggregation.dp and self.policy.clients_per_round:
            raise ConfigError("DP accounts for Poisson sampling: use sampling_rate, not clients_per_round")
        if self.policy.mode == "async" and self.aggregation.sampling_rate < 1.0:
            # amplification by sampling assumes each release's contributors were sampled for it; an
            # async update joins whichever buffer is open when it arrives
            raise ConfigError("async rounds account DP without sampling amplification: set sampling_rate 1")
        if self.aggregation.dp and self.policy.max_update_norm is None:
            raise ConfigError("DP needs a clip bound: set max_update_norm")
        if self.aggregation.secure_aggregation is not None and (
                self.policy.max_update_norm is None or self.policy.mode == "async" or self.adapter.tier_ranks):
            # the device clips to max_update_norm, which sizes the fixed point; a masked sum needs one
            # cohort that answers the stages together, and one vector layout for all of it
            raise ConfigError("secure aggregation needs max_update_norm, sync rounds and one adapter rank")
        if self.adapter.kind == "prompt_tuning" and (self.aggregation.lora != "naive"
                                                     or self.aggregation.drift_control != "none"):
            raise ConfigError("exact, ffa and scaffold need a LoRA adapter, not prompt tuning")
        if self.adapter.kind == "prompt_tuning" and self.evaluation and self.evaluation.forgetting_action == "interpolate":
            # a soft prompt has no zero that is the base model: there is nothing to interpolate toward
            raise ConfigError("the interpolate forgetting guard needs a LoRA adapter, not prompt tuning")
        if self.adapter.tier_ranks and (self.aggregation.lora == "ffa" or self.aggregation.rule != "mean"
                                        or self.aggregation.dp or self.aggregation.optimizer != "sgd"):
            # tiers' factors of different ranks combine by zero-padding (naive) or in product space (exact)
            raise ConfigError("heterogeneous tier ranks need lora 'naive' or 'exact' with the mean rule, "
                              "the sgd server optimizer and no DP")

    @functools.cached_property
    def spec(self) -> AdapterSpec:
        return build_spec(self.model, self.adapter, self.base_model)

    @functools.cached_property
    def update_tensors(self) -> dict[str, tuple[int, ...]]:
        """The tensors an update carries: all of the adapter's, or under FFA-LoRA only the B factors
        (A stays frozen at the server's seeded initialisation, so it never travels)."""
        return self.update_tensors_for(self.adapter.rank)

    def update_tensors_for(self, rank: int) -> dict[str, tuple[int, ...]]:
        tensors = self.spec_for(rank).tensors
        if self.aggregation.lora == "ffa":
            tensors = {k: s for k, s in tensors.items() if not k.endswith("lora_A.weight")}
        if self.aggregation.drift_control == "scaffold":  # and the change of the device's control variate
            tensors = {**tensors, **{CONTROL_PREFIX + k: s for k, s in tensors.items()}}
        return tensors

    def spec_for(self, rank: int) -> AdapterSpec:
        """The adapter layout at `rank`: the global one, or a tier's own."""
        if rank == self.adapter.rank:
            return self.spec
        return build_spec(self.model, self.adapter.for_rank(rank), self.base_model)

    @property
    def tier_ranks(self) -> dict[str, int]:
        """Tiers that train a rank of their own (heterogeneous ranks), tier -> rank."""
        return {t: r for t, r in self.adapter.tier_ranks if r != self.adapter.rank}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> FederationConfig:
        """The config `to_json` stored (or an older version of it: absent sections take their defaults).

        A bad value raises ConfigError naming its path, the value and what is allowed."""
        try:
            return _stored().validate_json(text)
        except ValidationError as exc:
            raise ConfigError.from_validation(exc, what="stored federation config") from None

    def revised(self, **changes) -> FederationConfig:
        """The next revision of this config with `changes` applied (validated by the constructors)."""
        return dataclasses.replace(self, revision=self.revision + 1, **changes)


@functools.cache
def _stored() -> TypeAdapter[FederationConfig]:
    """The validator of stored configs, built on first use (a few ms, not at every import)."""
    return TypeAdapter(FederationConfig)
