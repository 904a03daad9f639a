"""The control plane's request bodies as pydantic models: validated once, then turned into configs.

Unknown fields are refused (a typo'd knob must not be silently ignored), and every number a
client controls is bounded.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from fleettune.shared import keys
from fleettune.shared.corpora import Domain
from fleettune.shared.device.models import NamedBase
from fleettune.shared.protocol.adapter_spec import LAYOUTS, AdapterConfig, ModelDims, TargetModule
from fleettune.shared.protocol import runtimes
from fleettune.shared.control import groups, tiers
from fleettune.shared.control.groups import GroupSpec, Rules
from fleettune.shared.control.model_files import TRAINABLE_HINT
from fleettune.shared.errors import Refusal
from fleettune.shared.federation import (DeviceFilter, DeviceProfile, EvaluationConfig, FederationConfig,
                                         LocalOptimizer, LrSchedule, UpdateEncoding)
from fleettune.shared.split import config as split_config
from fleettune.shared.secagg.config import SecureAggregation
from fleettune.shared.strategies.config import Algorithm, DriftControl, LoraMode, Rule, choose
from fleettune.shared.strategies.server_optimizers import ServerOptimizer

# The closed sets of names (algorithms, LoRA modes, rules, server optimizers, ...) are imported
# from the modules that give them meaning, never spelled again here.

Id = Annotated[str, StringConstraints(max_length=keys.ID_MAX_LENGTH, pattern=keys.ID_PATTERN)]


def keys_match(**constraints) -> dict:
    """A dict field's key rule as JSON Schema `propertyNames` (pydantic writes `patternProperties`,
    which leaves other keys allowed): the schema then says what validation enforces."""
    return {"propertyNames": constraints}
Token = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,31}$")]
AppVersion = Annotated[str, StringConstraints(pattern=r"^[0-9][0-9A-Za-z.+-]{0,31}$")]
PROFILE_FIELDS = tuple(f.name for f in dataclasses.fields(DeviceProfile) if f.name != "device")
ExportName = Literal[tuple(sorted({*runtimes.FORMATS, *runtimes.ALIASES}))]  # "tflite" is "litert"
Runtime = Literal[runtimes.DECLARABLE]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
ModelId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_./-]*$")]

# Models the control plane knows the shape of, by the names people use for them.
MODELS: dict[str, tuple[ModelDims, str]] = {
    "tiny": (LAYOUTS["tiny-llama"], "tiny"),
    "tiny-llama": (LAYOUTS["tiny-llama"], "tiny"),
    "smollm2": (LAYOUTS["smollm2-135m"], "smollm2"),
    "HuggingFaceTB/SmolLM2-135M-Instruct": (LAYOUTS["smollm2-135m"], "smollm2"),
    "llama-1b": (LAYOUTS["llama-1b"], "llama-1b"),
    "meta-llama/Llama-3.2-1B": (LAYOUTS["llama-1b"], "llama-1b"),
}


class Strict(BaseModel):
    # strict: no string-to-number or bool-to-int coercion, as the protocol calls such values malformed
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _integral_numbers(cls, data: Any) -> Any:
        """JSON has one number type: 5.0 is the integer 5, as JSON Schema says; 5.5, "5" and true are not."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: _integral(v, fields[k].annotation) if k in fields else v for k, v in data.items()}


def _integral(value: Any, annotation: Any) -> Any:
    """`value` with integral floats made ints wherever `annotation` takes an int (in unions and containers)."""
    if isinstance(value, float) and value.is_integer() and _takes(annotation, int):
        return int(value)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _integral(value, args[0])
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return {k: _integral(v, args[1]) for k, v in value.items()}
    if origin is list and isinstance(value, list) and args:
        return [_integral(v, args[0]) for v in value]
    return value


def _takes(annotation: Any, kind: type) -> bool:
    if annotation is kind:
        return True
    if typing.get_origin(annotation) is typing.Annotated:
        return _takes(typing.get_args(annotation)[0], kind)
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and any(
        _takes(a, kind) for a in typing.get_args(annotation))


class LoraIn(Strict):
    type: Literal["lora"]
    rank: int = Field(8, ge=1, le=256)
    alpha: int = Field(16, ge=1, le=4096)
    target_modules: list[TargetModule] = Field(default=["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1,
                                               max_length=7)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    tier_ranks: dict[Id, Annotated[int, Field(ge=1, le=256)]] = Field(
        default={}, max_length=16, json_schema_extra=keys_match(maxLength=keys.ID_MAX_LENGTH, pattern=keys.ID_PATTERN), description="heterogeneous ranks: tier -> the LoRA rank its devices train "
                                                "(each at most `rank`; needs lora 'naive' or 'exact')")

    def to_config(self) -> AdapterConfig:
        try:
            return AdapterConfig(kind=self.type, rank=self.rank, alpha=self.alpha,
                                 target_modules=tuple(dict.fromkeys(self.target_modules)), dropout=self.dropout,
                                 tier_ranks=tuple(self.tier_ranks.items()))
        except ValueError as exc:
            raise Refusal(422, "invalid_config", str(exc)) from None


class QloraIn(LoraIn):
    type: Literal["qlora"]  # type: ignore[assignment]
    bits: Literal[4] = 4
    quant_type: Literal["nf4"] = "nf4"


class PromptTuningIn(Strict):
    type: Literal["prompt_tuning"]
    num_virtual_tokens: int = Field(16, ge=1, le=512)

    def to_config(self) -> AdapterConfig:
        return AdapterConfig(kind="prompt_tuning", num_virtual_tokens=self.num_virtual_tokens)


AdapterIn = Annotated[LoraIn | QloraIn | PromptTuningIn, Field(discriminator="type")]


class RoundConfigIn(Strict):
    timeout_seconds: float | None = Field(None, gt=0, le=30 * 24 * 3600)
    min_samples_per_client: int | None = Field(None, ge=1, le=10**9)
    min_clients: int | None = Field(None, ge=1, le=10**6, description="quorum: updates a round needs")
    max_rounds: int | None = Field(None, ge=1, le=100_000)
    max_update_norm: float | None = Field(None, gt=0, le=1e6, description="server-side L2 clip of whole updates")
    server_lr: float | None = Field(None, gt=0, le=100)
    max_num_samples: int | None = Field(None, ge=1, le=10**9)
    clients_per_round: int | None = Field(None, ge=0, le=10**6, description="0: every enrolled device; else the "
                                          "server picks this many per round (more, smaller rounds)")
    mode: Literal["sync", "async"] | None = Field(None, description="async: buffered asynchronous rounds (FedBuff)")
    buffer_size: int | None = Field(None, ge=1, le=10**6, description="async: publish after this many updates")
    max_staleness: int | None = Field(None, ge=0, le=10**6, description="async: refuse updates from older versions")
    staleness_exponent: float | None = Field(None, ge=0, le=10, description="async: a in (1 + staleness)^-a")
    participation_weighting: bool | None = Field(None, description="async: weigh each update by the versions since "
                                                 "the device's previous one (FedAU), so fast devices do not dominate")


class DeviceFilterIn(Strict):
    min_ram_mb: int = Field(0, ge=0, le=10**7)
    min_storage_mb: int = Field(0, ge=0, le=10**9)
    groups: list[Id] = Field(default=[], max_length=16)

    def to_config(self) -> DeviceFilter:
        return DeviceFilter(self.min_ram_mb, self.min_storage_mb, tuple(self.groups))


class StrategyParams(Strict):
    learning_rate: float | None = Field(None, gt=0, le=10)
    local_epochs: int | None = Field(None, ge=1, le=1000)
    max_grad_norm: float | None = Field(None, gt=0, le=1e6, description="per-step clip on the device")
    weight_decay: float | None = Field(None, ge=0, le=10)
    batch_size: int | None = Field(None, ge=1, le=4096)
    max_steps: int | None = Field(None, ge=0, le=10**6, description="steps per round; 0: local_epochs in full")
    proximal_mu: float | None = Field(None, ge=0, le=100, description="FedProx: the device's proximal term")
    local_optimizer: LocalOptimizer | None = Field(
        None, description="sgd: devices send lr x their mean gradient, for an adaptive server optimizer")
    update_encoding: UpdateEncoding | None = Field(
        None, description="how devices code updates: float32, float16, bfloat16, int8, int4 or int2 (block scales, "
        "stochastic rounding) or topk; with error feedback on the device")
    update_density: float | None = Field(None, gt=0, le=0.5, description="topk: the share of entries sent")
    lr_schedule: LrSchedule | None = Field(
        None, description="cosine: each round's device learning rate decays towards lr_floor x learning_rate "
        "by the policy's max_rounds")
    lr_floor: float | None = Field(None, ge=0, le=1)


class DpIn(Strict):
    noise_multiplier: float = Field(gt=0, le=100, description="z: noise std on the sum = z x max_update_norm")
    delta: float = Field(1e-5, gt=0, lt=1)
    max_epsilon: float | None = Field(None, gt=0, le=1e6, description="complete before a round would pass it")


class SecureAggregationIn(Strict):
    """SecAgg+ (see docs/secure-aggregation.md): the server learns only the cohort's sum."""

    max_weight: int = Field(64, ge=1, le=1_000_000, description="a device's sample count is capped here")
    precision_bits: int = Field(16, ge=8, le=40, description="fixed-point fractional bits, at least")
    degree: int | None = Field(None, ge=4, le=10_000, description="neighbours per device; absent: sized from "
                                                                   "the cohort and dropout")
    dropout: float = Field(1 / 3, ge=0, lt=0.5, description="the share of devices that may vanish")
    min_survivors: int = Field(2, ge=2, le=10**6)
    stage_timeout_s: float = Field(120.0, gt=0, le=86400)
    max_attempts: int = Field(3, ge=1, le=10)


class AggregationIn(Strict):
    """Overrides of the algorithm's preset (see shared/strategies/config.py)."""

    lora: LoraMode | None = None
    rule: Rule | None = None
    trim: int | None = Field(None, ge=1, le=10_000)
    optimizer: ServerOptimizer | None = None
    beta1: float | None = Field(None, ge=0, lt=1)
    beta2: float | None = Field(None, ge=0, lt=1)
    tau: float | None = Field(None, gt=0, le=1)
    bias_correction: bool | None = None
    max_weight_ratio: float | None = Field(None, ge=1, le=1e6)
    working_rank_factor: int | None = Field(None, ge=1, le=64)
    drift_control: DriftControl | None = None
    sampling_rate: float | None = Field(None, gt=0, le=1, description="Poisson sampling of each round's cohort "
                                                                      "(the DP accountant counts on it)")
    dp: DpIn | None = None
    incremental: bool | None = Field(None, description="fold updates into partial sums as they arrive (linear "
                                                       "rules only; the others always read every update at close)")
    secure_aggregation: SecureAggregationIn | None = None

    def fields(self) -> dict:
        given = {k: v for k, v in self.model_dump(exclude={"dp", "secure_aggregation"}).items() if v is not None}
        if self.dp is not None:
            given.update({f"dp_{k}": v for k, v in self.dp.model_dump().items()})
        if self.secure_aggregation is not None:
            given["secure_aggregation"] = SecureAggregation(**self.secure_aggregation.model_dump())
        return given


class StrategyIn(StrategyParams):
    algorithm: Algorithm | None = Field(None, description="an aggregation preset; absent: unchanged")
    aggregation: AggregationIn | None = None
    round_config: RoundConfigIn | None = None
    device_filter: DeviceFilterIn | None = None


class EvaluationIn(Strict):
    base_model: NamedBase = "tiny"
    domains: list[Domain] = Field(
        default=["literature", "legal", "code"], min_length=1, max_length=4)
    eval_chars: int = Field(12_000, ge=1_000, le=1_000_000)


EXPORTS_HELP = ("formats each published version is exported to for on-device runtimes (onnx, executorch, "
                "coreml, litert / tflite); a registered base version's `formats` add theirs")


class FederationIn(Strict):
    name: Id
    model_id: ModelId = "tiny-llama"
    adapter: AdapterIn | None = None
    strategy: StrategyIn | None = None
    evaluation: EvaluationIn | None = None
    seed: int = Field(0, ge=0, le=2**31)
    exports: list[ExportName] | None = Field(None, max_length=8, description=EXPORTS_HELP)


class TrainingSessionIn(Strict):
    model_id: ModelId
    strategy: Algorithm = "fedavg"
    adapter_config: AdapterIn | None = None
    strategy_params: StrategyParams | None = None
    aggregation: AggregationIn | None = None
    round_config: RoundConfigIn | None = None
    device_filter: DeviceFilterIn | None = None
    federation: Id | None = Field(None, description="train this federation; a new one is created when absent")
    evaluation: EvaluationIn | None = None
    exports: list[ExportName] | None = Field(None, max_length=8, description=EXPORTS_HELP)


class Capabilities(Strict):
    """What a device declares about itself: dynamic groups and tiers are decided from it."""

    ram_mb: int | None = Field(None, ge=0, le=10**7)
    storage_mb: int | None = Field(None, ge=0, le=10**9)
    tier: Id = "default"
    os: Token | None = None
    app_version: AppVersion | None = None
    region: Token | None = None
    accelerator: Token | None = None
    runtime: Runtime | None = Field(None, description="the runtime this device serves with; check-in's `serve` "
                                    "then carries that format's base and adapter (default torch: the PEFT directory)")
    runtime_base: Sha256 | None = Field(None, description="sha256 of the exported base this device holds: "
                                        "when it is still current, only the adapter is served")

    def profile(self, device: str) -> DeviceProfile:
        return DeviceProfile(device, **self.model_dump(exclude=set(type(self).model_fields) - set(PROFILE_FIELDS)))


class DeviceIn(Capabilities):
    device_id: Id
    identity_key: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = Field(
        None, description="the device's Ed25519 identity public key (hex) for secure aggregation, registered by "
        "the operator: the device cannot replace it (without one, the device registers its own, once)")


class CheckInIn(Capabilities):
    group: Id | None = None  # accepted from older clients and ignored: membership is the server's to decide


class UploadUrlIn(Strict):
    round: int = Field(ge=1, lt=2**53)
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    size: int = Field(ge=1, le=2**40)


class SubmitIn(Strict):
    round: int = Field(ge=1, lt=2**53)
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    num_samples: int = Field(ge=0, lt=2**53)
    base_version: int = Field(ge=0, lt=2**53)
    train_seconds: float = Field(0.0, ge=0, le=10**7)
    metrics: dict[Annotated[str, StringConstraints(min_length=1, max_length=32)], float] = Field(
        default={}, max_length=8, json_schema_extra=keys_match(minLength=1, maxLength=32))


class RulesIn(Strict):
    """A dynamic group's rules over declared capabilities: all that are set must match."""

    min_ram_mb: int | None = Field(None, ge=0, le=10**7)
    max_ram_mb: int | None = Field(None, ge=0, le=10**7)
    min_storage_mb: int | None = Field(None, ge=0, le=10**9)
    max_storage_mb: int | None = Field(None, ge=0, le=10**9)
    tier: list[Id] = Field(default=[], max_length=32)
    os: list[Token] = Field(default=[], max_length=32)
    region: list[Token] = Field(default=[], max_length=64)
    accelerator: list[Token] = Field(default=[], max_length=32)
    min_app_version: AppVersion | None = None
    max_app_version: AppVersion | None = None

    def to_rules(self) -> Rules:
        try:
            return Rules.from_dict(self.model_dump())
        except ValueError as exc:  # an app version bound `packaging` cannot order
            raise Refusal(422, "invalid_group", str(exc)) from None


class GroupIn(Strict):
    kind: groups.Kind | None = Field(
        None, description="absent: static with only devices, dynamic with only rules, hybrid with both")
    devices: list[Id] = Field(default=[], max_length=100_000)
    rules: RulesIn | None = None
    exclude: list[Id] = Field(default=[], max_length=10_000)

    def to_spec(self) -> GroupSpec:
        kind = self.kind or ("static" if self.rules is None else "hybrid" if self.devices else "dynamic")
        try:
            return GroupSpec(kind, self.rules.to_rules() if self.rules else None, tuple(self.exclude))
        except ValueError as exc:
            raise Refusal(422, "invalid_group", str(exc)) from None


def resolve_model(model_id: str, registered: dict | None = None) -> tuple[ModelDims, str]:
    """(dimensions, base model reference) of a known model id, or of a registered base model.

    A registered base trains on its current version, pinned as `id@version`: devices fetch exactly
    those bytes from the registry, whatever becomes current later."""
    if model_id in MODELS:
        return MODELS[model_id]
    if registered and registered.get("facts"):
        facts = registered["facts"]
        if not facts["trainable"]:
            raise Refusal(422, "model_not_trainable", f"{model_id} version {facts['version']} cannot be trained: "
                          f"{facts['why_not']}")
        return ModelDims(**facts["dims"]), f"{model_id}@{facts['version']}"
    if registered and registered.get("dims"):
        return ModelDims(**registered["dims"]), model_id
    if registered:
        raise Refusal(422, "model_not_trainable", f"{model_id} has no ready version yet: {TRAINABLE_HINT}")
    raise Refusal(422, "unknown_model", f"model_id {model_id!r} is neither a known model ({sorted(MODELS)}) "
                  f"nor a registered base model: register one ({TRAINABLE_HINT})")


def apply_strategy(config: FederationConfig, params: StrategyParams | None, rounds: RoundConfigIn | None,
                   device_filter: DeviceFilterIn | None, algorithm: str | None = None,
                   aggregation: AggregationIn | None = None) -> dict:
    """The FederationConfig fields that these parts of a request change (for `config.revised`).

    Only a translation of the request's fields: what an algorithm and aggregation fields mean (its
    preset, and the policy and training fields that come with it) is strategies.config.choose's;
    the fields the request sets itself win over those.
    """
    changes: dict = {}
    training = {k: v for k, v in params.model_dump(include=set(StrategyParams.model_fields)).items()
                if v is not None} if params is not None else {}
    policy = {}
    if rounds is not None:
        given = {k: v for k, v in rounds.model_dump().items() if v is not None}
        renamed = {"min_clients": "min_updates"}  # the API's name for RoundPolicy's quorum
        policy = {renamed.get(k, k): v for k, v in given.items()}
    if algorithm is not None or aggregation is not None:
        try:
            chosen = choose(config.aggregation, algorithm, **(aggregation.fields() if aggregation is not None else {}))
        except ValueError as exc:
            raise Refusal(422, "invalid_config", str(exc)) from None
        policy, training = {**chosen.policy, **policy}, {**chosen.training, **training}
        changes["aggregation"] = chosen.aggregation
    if training:
        changes["training"] = _replace(config.training, training)
    if policy:
        changes["policy"] = _replace(config.policy, policy)
    if device_filter is not None:
        changes["device_filter"] = device_filter.to_config()
    return changes


def evaluation_config(evaluation: EvaluationIn | None) -> EvaluationConfig | None:
    if evaluation is None:
        return None
    return EvaluationConfig(base_model=evaluation.base_model, domains=tuple(evaluation.domains),
                            eval_chars=evaluation.eval_chars)


def _replace(current, changes: dict):
    try:
        return dataclasses.replace(current, **changes)
    except ValueError as exc:  # the config's own cross-field checks (ConfigError is a ValueError)
        raise Refusal(422, "invalid_config", str(exc)) from None


# --- cascading tiers ---------------------------------------------------------------------------------

class DistillationIn(Strict):
    kind: Literal["lora", "prompt_tuning"] = "lora"
    rank: int = Field(8, ge=1, le=64)
    num_virtual_tokens: int = Field(16, ge=1, le=128)
    prompts: int = Field(32, ge=1, le=1024)
    prompt_tokens: int = Field(24, ge=4, le=256)
    new_tokens: int = Field(48, ge=4, le=256)
    steps: int = Field(60, ge=1, le=10_000)
    learning_rate: float = Field(5e-3, gt=0, le=1)
    temperature: float = Field(0.8, gt=0, le=2)


class VariantIn(Strict):
    mode: tiers.Mode = "train"
    base_model: NamedBase | None = Field(None, description="infer tiers: the tier's own base")
    adapter: Literal["federation", "distilled", "none"] = "federation"
    # visible ASCII only: \s differs between JSON Schema (ECMA) and the validator (Rust) at U+0085
    api_url: Annotated[str, StringConstraints(pattern=r"^https?://[!-~]{1,500}$")] | None = None
    distillation: DistillationIn = DistillationIn()


TIER_KEY = rf"^(\*|{keys.ID_RULE})$"


class DeploymentIn(Strict):
    tiers: dict[Annotated[str, StringConstraints(max_length=keys.ID_MAX_LENGTH, pattern=TIER_KEY)], VariantIn] = Field(
        max_length=16, description="tier -> what its devices run; '*' for tiers not named",
        json_schema_extra=keys_match(maxLength=keys.ID_MAX_LENGTH, pattern=TIER_KEY))

    def to_variants(self) -> dict:
        from fleettune.shared.control.tiers import DEFAULT, Distillation, Variant

        out = {}
        for tier, v in self.tiers.items():
            try:
                out[tier] = Variant(mode=v.mode, base_model=v.base_model, adapter=v.adapter, api_url=v.api_url,
                                    distillation=Distillation(**v.distillation.model_dump()))
            except ValueError as exc:
                raise Refusal(422, "invalid_deployment", f"tier {tier}: {exc}") from None
            if tier == DEFAULT and out[tier].distilled:
                raise Refusal(422, "invalid_deployment", "distil for named tiers, not for '*'")
        return out


class ExportIn(Strict):
    formats: list[ExportName] = Field(min_length=1, max_length=8, description="formats to export this version to")


class DistillIn(Strict):
    version: int = Field(ge=1, lt=2**53)
    tier: Id


# --- canary rollouts ---------------------------------------------------------------------------------

class GatesIn(Strict):
    max_perplexity_ratio: float = Field(1.05, ge=1, le=100)
    max_forgetting_ratio: float = Field(1.25, ge=1, le=100)
    max_loss_increase: float = Field(0.05, ge=0, le=100)
    max_error_rate_increase: float = Field(0.02, ge=0, le=1)
    max_acceptance_drop: float = Field(0.05, ge=0, le=1)
    min_reports: int = Field(10, ge=2, le=100_000)
    alpha: float = Field(0.05, gt=0, lt=1)
    max_looks: int = Field(20, ge=1, le=10_000)


class RolloutIn(Strict):
    version: int = Field(ge=1, lt=2**53)
    groups: list[Id] = Field(default=[], max_length=16, description="target groups; empty: every device")
    start_percent: float = Field(10.0, gt=0, le=100)
    step_percent: float = Field(10.0, gt=0, le=100)
    min_step_seconds: float = Field(3600.0, ge=0, le=30 * 24 * 3600)
    max_step_seconds: float | None = Field(
        7 * 24 * 3600.0, ge=60, le=90 * 24 * 3600,
        description="a step that neither advances nor rolls back within this long pauses as inconclusive; "
                    "null: it waits for reports however long")
    auto_advance: bool = True
    gates: GatesIn = GatesIn()
    start: bool = Field(False, description="start at once (the server's evaluation gate still applies)")


class ReasonIn(Strict):
    reason: Annotated[str, StringConstraints(max_length=500)] | None = None


class PercentIn(Strict):
    percent: float = Field(ge=0, le=100)
    reason: Annotated[str, StringConstraints(min_length=1, max_length=500)]


Finite = dict(allow_inf_nan=False)


class ReportIn(Strict):
    """A device's quality report on the version it serves: every value bounded and finite."""

    # at least one measure: the rule values() enforces, said in the schema too
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"required": [name], "properties": {name: {"not": {"type": "null"}}}}
        for name in ("eval_loss", "perplexity", "acceptance_rate", "requests")]})

    version: int = Field(ge=0, lt=2**53)
    eval_loss: float | None = Field(None, ge=0, le=100, description="mean token loss on local held-out text", **Finite)
    perplexity: float | None = Field(None, ge=1, le=1e6, description="instead of eval_loss", **Finite)
    acceptance_rate: float | None = Field(None, ge=0, le=1, description="users accepting the model's output",
                                          **Finite)
    requests: int | None = Field(None, ge=0, le=10**7)
    errors: int | None = Field(None, ge=0, le=10**7)

    def values(self) -> dict[str, float]:
        if self.eval_loss is not None and self.perplexity is not None:
            raise Refusal(422, "invalid_report", "give eval_loss or perplexity, not both")
        if (self.errors is None) != (self.requests is None) or (self.errors or 0) > (self.requests or 0):
            raise Refusal(422, "invalid_report", "errors needs requests, and at most as many")
        out = {}
        if self.eval_loss is not None or self.perplexity is not None:
            out["eval_loss"] = self.eval_loss if self.eval_loss is not None else math.log(self.perplexity)
        if self.acceptance_rate is not None:
            out["acceptance_rate"] = self.acceptance_rate
        if self.requests:
            out["error_rate"] = self.errors / self.requests
        if not out:
            raise Refusal(422, "invalid_report", "a report needs eval_loss, perplexity, acceptance_rate or requests")
        return out


# --- split learning ----------------------------------------------------------------------------------

class SplitIn(Strict):
    mode: split_config.Mode = Field("u_shaped", description="two_part: the server computes the loss "
                                    "and sees the labels (the text); u_shaped: they stay on the device")
    base_model: NamedBase = "tiny"
    cut: int = Field(1, ge=1, le=512, description="k: the device runs the embeddings and layers [0, k)")
    top_layers: int = Field(1, ge=0, le=512, description="u_shaped: the last layers the device also runs")
    clip: float = Field(100.0, gt=0, le=1e6, description="C: per-example L2 bound on the activations")
    sigma: float = Field(0.0, ge=0, le=1e3, description="noise std = sigma x C")
    delta: float = Field(1e-5, gt=0, lt=1)
    bottleneck: int = Field(0, ge=0, le=65536, description="r: each token's activations projected onto r "
                            "directions before the clip and the noise (0: sent whole, seq x hidden)")
    server_returns: split_config.Returns = Field(
        "residual", description="u_shaped: residual (what the server's layers add to the residual stream) or "
        "correction (only what their LoRA changes; the device runs their frozen base itself, forward only)")
    sample_rate: float | None = Field(None, gt=0, le=1, description="q: devices Poisson-sample each sequence "
                                      "with this probability, so the server's accountant knows each device's epsilon")
    max_epsilon: float | None = Field(None, gt=0, le=1e6, description="a device's steps are refused before its "
                                      "epsilon would pass this (needs sigma > 0 and sample_rate)")
    max_batch: int = Field(32, ge=1, le=1024)
    seq_len: int = Field(64, ge=2, le=4096)
    server_lr: float = Field(1e-3, gt=0, le=1)
    publish_every: int = Field(50, ge=1, le=10**6)
    pending_ttl_s: float = Field(60.0, gt=0, le=3600)
