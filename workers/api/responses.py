"""The success responses of the API's routes, as pydantic models: the OpenAPI's typed 2xx bodies.

They describe the dicts that shared/control builds; they do not build them. So every model lets
members it does not name pass through (extra="allow"), and `Typed` routes send back exactly the
members the route returned (response_model_exclude_unset): a member typed here as optional, because
only some states have it, stays absent where it was absent. Free-form documents (configs,
manifests, metrics) stay `dict[str, Any]`: a response model must never turn an answer into a 500.
"""

from __future__ import annotations

from typing import Any

from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field


class Typed(APIRoute):
    """A route whose answer is checked against its response model, then sent with the members it had."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["response_model_exclude_unset"] = True  # optional members absent, not null: as before
        super().__init__(*args, **kwargs)


class Out(BaseModel):
    """The base of every response: members not modelled here pass through untouched."""

    model_config = ConfigDict(extra="allow")


# --- operations ------------------------------------------------------------------------------------

class Health(Out):
    """The API and its Redis answer."""

    status: str


class DeadLetter(Out):
    """A message refused for good (Redis stream fields: every value a string, the round too)."""

    reason: str
    detail: str
    federation: str
    round: str
    device: str
    digest: str
    at: str


class DeadLetterList(Out):
    """The newest dead letters first."""

    deadletters: list[DeadLetter]


# --- federations ------------------------------------------------------------------------------------

class Federation(Out):
    """A federation: status, round, newest version, its config and any config waiting for the next round."""

    name: str
    status: str | None = Field(description="idle | active | stopped | halted | completed")
    round: int
    version: int
    session: str | None
    config: dict[str, Any]
    pending_config: dict[str, Any] | None
    devices: int = Field(description="devices enrolled")
    stats: dict[str, int]


class FederationList(Out):
    """Every federation."""

    federations: list[Federation]


class ConfigChange(Out):
    """A new adapter or strategy: the config revision it made and the round it applies from."""

    federation: str
    revision: int
    applies_from_round: int
    applied: str = Field(description="'now', or 'when the next round opens'")
    config: dict[str, Any]


class Round(Out):
    """One round: its status, timing, cohort and outcomes."""

    federation: str
    round: int
    status: str = Field(description="open | closing | closed | failed")
    reason: str | None
    base_version: int
    version: int | None = Field(description="the version it published, once closed")
    opened_at: float
    deadline: float
    closed_at: float | None
    cohort_size: int
    config_revision: int
    accepted: int
    rejected: int
    rejected_by_reason: dict[str, int]
    contributors: list[str]


class Manifest(Out):
    """A published version's manifest (what aggregation wrote; the evaluation once there is one)."""

    federation: str
    version: int
    adapter_sha256: str
    num_parameters: int
    round: int | None = None
    parent_version: int | None = None
    contributors: list[str] | None = None
    config_revision: int | None = None
    evaluation: dict[str, Any] | None = None


class ManifestList(Out):
    """A page of a federation's published versions, oldest first: the newest `limit` below `before`."""

    federation: str
    versions: list[Manifest]
    next_before: int | None = Field(None, description="pass as `before` for the page of older versions; "
                                    "null on the oldest page")


class DeviceToken(Out):
    """A registered device and its token (shown once)."""

    federation: str
    device_id: str
    token: str


class Device(Out):
    """A device: what it declared (when it has declared anything), enrolment and revocation."""

    device: str
    ram_mb: int | None = None
    storage_mb: int | None = None
    tier: str | None = None
    os: str | None = None
    app_version: str | None = None
    region: str | None = None
    accelerator: str | None = None
    enrolled: bool
    revoked: bool


class DeviceList(Out):
    """A federation's devices."""

    federation: str
    devices: list[Device]


class GroupSizes(Out):
    """Group -> devices listed plus those its rules matched at their last check-in."""

    federation: str
    groups: dict[str, int]


class Group(Out):
    """A static, dynamic or hybrid group: listed devices, rules, exclusions, devices matched."""

    group: str
    kind: str = Field(description="static | dynamic | hybrid")
    devices: list[str]
    rules: dict[str, Any] | None
    exclude: list[str]
    matched: list[str]
    federation: str


# --- presigned transfers ---------------------------------------------------------------------------

class SignedUrl(Out):
    """A presigned request: call `url` with `method` and exactly these headers before `expires_at`."""

    url: str
    method: str
    headers: dict[str, str]
    expires_at: float


class ObjectUpload(SignedUrl):
    """A write-once upload URL for the object `key`, bound to its sha256 and size."""

    key: str


class ModelDownload(SignedUrl):
    """A registered model file's download, with what to check it against."""

    sha256: str
    size: int
    filename: str


class BaseDownload(ModelDownload):
    """A registered base model's download, as check-in hands it out."""

    format: str | None = None


# --- device gateway --------------------------------------------------------------------------------

class ServedAdapter(Out):
    """The adapter a device serves: the federation's version or a tier's distilled one."""

    kind: str = Field(description="federation | distilled")
    version: int
    download: dict[str, SignedUrl]


class Serve(Out):
    """What a device should run now: a canary's candidate or the serving version, on which base."""

    mode: str = Field(description="train | infer | api")
    version: int
    previous: int
    rollout: str | None
    arm: str | None = Field(description="canary | control | null (not targeted)")
    base_download: BaseDownload | None = Field(None, description="null for a built-in base; absent in api mode")
    base_model: str | None = Field(None, description="absent in api mode")
    api_url: str | None = Field(None, description="api mode only")
    adapter: ServedAdapter | None
    runtime: ServedRuntime | None = Field(None, description="present when the device declared a runtime other "
                                          "than torch")


class UploadSlot(Out):
    """Where a trained update goes: its key, and the route that signs an upload URL for it."""

    key: str
    url_from: str


class CheckIn(Out):
    """A check-in's answer: always `serve`; a training tier gets the round's plan, other tiers their `tier`."""

    federation: str
    device: str
    action: str = Field(description="train | infer | api")
    tier: str | None = Field(None, description="tiers that do not train")
    # the round's plan (action "train")
    round: int | None = None
    deadline: float | None = None
    base_version: int | None = None
    config_revision: int | None = None
    adapter: dict[str, Any] | None = None
    base_model: str | None = None
    base_download: BaseDownload | None = None
    training: dict[str, Any] | None = None
    lora_aggregation: str | None = None
    drift_control: str | None = None
    min_samples: int | None = None
    download: dict[str, SignedUrl] | None = None
    upload: UploadSlot | None = None
    max_update_bytes: int | None = None
    groups: list[str]
    serve: Serve


class SubmitReceipt(Out):
    """A submission received (202): its receipt, the same for a repeat (`duplicate`), and where to poll."""

    receipt: str
    federation: str
    round: int
    device: str
    received_at: float
    duplicate: bool
    status_url: str


class ReceiptStatus(Out):
    """A submission's outcome so far."""

    receipt: str
    federation: str
    device: str
    round: int
    received_at: float
    status: str = Field(description="pending | accepted | rejected")
    reason: str | None


class ReportAck(Out):
    """A quality report recorded against the device's rollout arm, and where the rollout stands."""

    federation: str
    device: str
    version: int
    rollout: str
    arm: str | None
    rollout_status: str | None
    percent: float | None


# --- split learning --------------------------------------------------------------------------------

class SplitDevice(Out):
    """One device's split steps."""

    steps: int


class SplitStatus(Out):
    """The split config, the server part's version and steps, refusals by reason, each device's steps."""

    federation: str
    config: dict[str, Any]
    server_part_version: int
    server_steps: int
    rejected: dict[str, int]
    devices: dict[str, SplitDevice]
    privacy: str


# --- tiers and rollouts ----------------------------------------------------------------------------

class TierVariant(Out):
    """What a tier runs: train, infer (own or distilled adapter) or call an API."""

    mode: str
    base_model: str | None
    adapter: str
    api_url: str | None
    distillation: dict[str, Any]


class Deployment(Out):
    """Tier -> variant ('*' for tiers not named)."""

    federation: str
    tiers: dict[str, TierVariant]


class ArtifactFile(Out):
    """One file of an export: where it is stored, and what to check it against."""

    key: str
    sha256: str
    size: int
    download: SignedUrl | None = Field(None, description="a presigned GET, for an operator's download")


class Artifact(Out):
    """A version exported to one format: pending, ready (with its files and parity) or failed (and why)."""

    format: str
    runtime: str
    status: str = Field(description="pending | ready | failed")
    attempts: int
    reason: str | None = Field(None, description="why the last attempt failed (the converter's words)")
    max_abs_logit_diff: float | None = Field(None, description="against PyTorch + PEFT on fixed prompts; null "
                                             "where the runtime cannot run here (Core ML: see checks)")
    checks: dict[str, Any] | None = Field(None, description="what was checked where parity could not be measured")
    base: ArtifactFile | None = Field(None, description="the base exported once per base model and adapter layout")
    adapter: ArtifactFile | None = Field(None, description="this version's adapter: the graph's LoRA inputs")
    inputs: list[str] | None = Field(None, description="the graph's inputs in order: input_ids, then the adapter's "
                                     "tensors by their safetensors names")
    full_over_adapter: float | None = Field(None, description="base bytes / adapter bytes: what serving the "
                                            "adapter alone saves per version update")


class ArtifactList(Out):
    """A published version's exports for on-device runtimes."""

    federation: str
    version: int
    artifacts: list[Artifact]


class ExportQueued(Out):
    """Exports queued for a worker."""

    federation: str
    version: int
    formats: list[str]
    status: str


class ServedRuntime(Out):
    """The served version in the device's runtime's format (check-in's `serve.runtime`)."""

    runtime: str
    format: str
    status: str = Field(description="ready | pending (no version exported to this format yet: check in later)")
    version: int | None
    max_abs_logit_diff: float | None = None
    inputs: list[str] | None = None
    max_tokens: int | None = Field(None, description="the longest sequence the graph takes")
    context: int | None = Field(None, description="a fixed-length graph's context: right-pad to it (LiteRT)")
    base_sha256: str | None = None
    base: dict[str, Any] | None = Field(None, description="presigned GET of the exported base with sha256 and "
                                        "size; null when the device declared it holds this base (runtime_base)")
    adapter: dict[str, Any] | None = Field(None, description="presigned GET of this version's adapter file")


class DistillQueued(Out):
    """A distillation queued for a worker."""

    federation: str
    version: int
    tier: str
    status: str


class RolloutChange(Out):
    """One entry of a rollout's history: who moved it, from what to what, and why."""

    at: float
    by: str
    action: str
    from_percent: float
    to_percent: float
    status: str
    reason: str | None


class Rollout(Out):
    """A canary rollout: its target, steps, gates, status, the arms' latest comparison and its history."""

    id: str
    federation: str
    version: int
    previous: int
    groups: list[str]
    start_percent: float
    step_percent: float
    min_step_seconds: float
    max_step_seconds: float | None = None
    auto_advance: bool
    gates: dict[str, Any]
    status: str = Field(description="pending | active | paused | completed | rolled_back")
    percent: float
    created_at: float
    created_by: str
    step_started_at: float | None
    looks: int
    looked_at_reports: int
    arms: dict[str, Any]
    comparisons: list[dict[str, Any]]
    reason: str | None
    history: list[RolloutChange]


class RolloutList(Out):
    """A federation's rollouts, newest first."""

    federation: str
    rollouts: list[Rollout]


class Serving(Out):
    """The serving version and the live rollout, if any."""

    federation: str
    serving: int
    rollout: Rollout | None


# --- training sessions and keys --------------------------------------------------------------------

class TrainingSession(Out):
    """A training session: its rounds, where it stands, and who started it."""

    id: str
    federation: str
    status: str = Field(description="pending | active | aggregating | completed | failed | stopped")
    reason: str | None
    model_id: str
    algorithm: str
    first_round: int
    last_round: int
    current_round: int
    round_status: str | None
    version: int
    created_at: float
    created_by: str


class SessionList(Out):
    """Training sessions, newest first."""

    sessions: list[TrainingSession]


class ApiKeyCreated(Out):
    """A new operator key (shown once)."""

    id: str
    scope: str
    name: str
    key: str


class ApiKey(Out):
    """An operator key, without its secret."""

    id: str
    scope: str
    name: str
    created_at: float
    revoked: bool


class ApiKeyList(Out):
    """Every operator key."""

    keys: list[ApiKey]


# --- model registry --------------------------------------------------------------------------------

class ModelFacts(Out):
    """What inspecting a base model's file found: its format, shapes, and whether devices can train it."""

    format: str
    dims: dict[str, Any] | None
    trainable: bool
    why_not: str | None


class ModelVersion(Out):
    """A model version: pending until its upload is verified, then ready and immutable."""

    model_id: str
    version: str
    filename: str
    sha256: str
    size: int
    formats: list[str]
    key: str
    status: str = Field(description="pending | ready")
    created_at: float
    completed_at: float | None = None
    upload_id: str | None = None
    facts: ModelFacts | None = None


class RegisteredModel(Out):
    """A registered base model or adapter, with its versions."""

    id: str
    kind: str = Field(description="base | adapter")
    base_model: str | None
    dims: dict[str, Any] | None
    description: str
    current_version: str | None
    created_at: float
    versions: list[ModelVersion]


class ModelList(Out):
    """Every registered model."""

    models: list[RegisteredModel]


class UploadPart(SignedUrl):
    """One part of a multipart upload: its number and the byte range it carries."""

    part_number: int
    offset: int
    length: int


class ModelUpload(Out):
    """A declared version and where its bytes go: one `upload`, or `parts` past the multipart threshold."""

    version: ModelVersion
    upload: ObjectUpload | None
    parts: list[UploadPart] | None
    part_size: int | None = None
