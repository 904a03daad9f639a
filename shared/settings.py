"""One frozen settings object, built from FLEETTUNE_* environment variables."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from fleettune.shared.errors import ConfigError

MiB = 1024 * 1024
PREFIX = "FLEETTUNE_"
# how messages name a field: by itself for keywords, by its variable while from_env builds
_naming: ContextVar[Callable[[str], str]] = ContextVar("naming", default=str)


Positive = Annotated[int, Field(gt=0)]
PositiveReal = Annotated[float, Field(gt=0)]


def _host_port(address: str) -> str:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError("each address must be host:port")
    return address


class Settings(BaseSettings):
    """Where the services are and how much a device may send.

    `redis_url` None means "no Redis": only the embedded demo runs then.
    `s3_endpoint` None means a local-directory object store under `data_dir`.

    `from_env` reads each field from FLEETTUNE_<FIELD> (a validation_alias names the few that
    differ, such as FLEETTUNE_TASK_TIME_LIMIT); an empty variable counts as unset, and FLEETTUNE_*
    variables no field reads are ignored. `Settings(...)` reads no environment. Every bad value
    raises ConfigError, naming the field (or variable), the value and what is allowed.
    """

    model_config = SettingsConfigDict(env_prefix=PREFIX, env_ignore_empty=True, frozen=True, extra="forbid",
                                      populate_by_name=True)

    redis_url: str | None = None
    s3_endpoint: str | None = None
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_bucket: str = "fleettune"
    s3_secure: bool = False
    data_dir: Path = Path(".fleettune")
    max_update_bytes: Positive = 64 * MiB
    max_envelope_bytes: Positive = 4096
    max_header_bytes: Positive = 1 * MiB
    task_time_limit_s: Positive = Field(300, validation_alias="FLEETTUNE_TASK_TIME_LIMIT")
    # unset: twice the time limit, and at least a minute over it (600 at the default limit)
    visibility_timeout_s: int = Field(default_factory=lambda data: _visibility(data.get("task_time_limit_s", 300)),
                                      validation_alias="FLEETTUNE_VISIBILITY_TIMEOUT")
    deadletter_maxlen: int = 100_000
    # how often beat looks for rounds past their deadline
    sweep_interval_s: float = Field(5.0, validation_alias="FLEETTUNE_SWEEP_INTERVAL")
    # how often workers look for messages of dead workers to requeue
    restore_interval_s: int = Field(10, validation_alias="FLEETTUNE_RESTORE_INTERVAL")
    torch_threads: int = 1  # per worker process: prefork already runs one process per core
    metrics_port: int = 0  # the worker's /metrics; 0 serves none
    metrics_addr: str = "127.0.0.1"  # 0.0.0.0 where Prometheus scrapes from another host
    s3_public_endpoint: str | None = None  # the S3 URL devices reach, for presigning (default: s3_endpoint)
    s3_region: str = "us-east-1"
    device_rate_limit: Positive = 120  # requests a device may make per rate window (429 past it)
    rate_window_s: Positive = Field(60, validation_alias="FLEETTUNE_RATE_WINDOW")
    # presigned GETs live this long; a PUT lives until its round's deadline
    url_ttl_s: Positive = Field(3600, validation_alias="FLEETTUNE_URL_TTL")
    # registry uploads above this go up in parts
    multipart_threshold_bytes: Positive = Field(64 * MiB, validation_alias="FLEETTUNE_MULTIPART_THRESHOLD")
    # a received message with no outcome after this is enqueued again
    redrive_after_s: float = Field(60.0, validation_alias="FLEETTUNE_REDRIVE_AFTER")
    # update objects and per-round sets live this long after their round
    retention_s: float = Field(7 * 86400.0, validation_alias="FLEETTUNE_RETENTION")
    # a round's info hash and its version's evaluation stay for this many later rounds, then go with
    # the retention of the round that many rounds on (keeps Redis flat however many rounds run)
    history_rounds: Positive = Field(1000, validation_alias="FLEETTUNE_HISTORY_ROUNDS")
    # a message's outcome and ledger entry (about 1.4 KB of Redis per message) live this long: a
    # redelivery or a device's retry within it is answered, not counted again
    message_ttl_s: int = Field(7 * 86400, validation_alias="FLEETTUNE_MESSAGE_TTL")
    # how long a close waits past the deadline for on-time messages in flight
    deadline_grace_s: float = Field(180.0, validation_alias="FLEETTUNE_DEADLINE_GRACE")
    # a task's retries through an outage of S3 or Redis, with exponential backoff, capped at
    # retry_backoff_max_s; past the budget the ledger re-drives the message
    max_retries: int = 10
    # a conversion to an on-device format that fails is tried this many times in all, with backoff
    export_attempts: Positive = Field(3, validation_alias="FLEETTUNE_EXPORT_ATTEMPTS")
    # a conversion takes minutes, not the seconds of the pipeline's tasks (task_time_limit_s); past
    # the broker's visibility timeout another worker may start the same export, which is harmless
    # (the base is content-addressed, the record written once) but wasted work
    export_time_limit_s: Positive = Field(1800, validation_alias="FLEETTUNE_EXPORT_TIME_LIMIT")
    retry_backoff_max_s: int = Field(60, validation_alias="FLEETTUNE_RETRY_BACKOFF_MAX")
    # devices hold only write-once (If-None-Match) upload URLs, so an accepted object's bytes cannot
    # change: the close trusts the sha256 ingest verified instead of hashing every object again
    updates_write_once: bool = True
    fold_batch: Positive = 64  # an ingest process commits its partial sum after this many updates ...
    fold_tail: int = 8  # ... or at every update once the round is within this many devices of complete ...
    fold_idle_s: PositiveReal = Field(0.5, validation_alias="FLEETTUNE_FOLD_IDLE")  # ... or after this long idle
    split_url: str | None = None  # the split-learning server the gateway forwards devices' steps to
    split_rate_limit: int = 6000  # split steps a device may send per rate window (a step per batch)
    secagg_rate_limit: Positive = 1200  # secure-aggregation stage polls and answers per device per rate window
    # request bodies, bounded while they stream in (413 past the bound; nothing is read before auth)
    max_device_body_bytes: Positive = 16 * 1024  # check-in, upload-url, submit, reports: JSON of a few fields
    max_operator_body_bytes: Positive = 1 * MiB  # every other JSON route
    max_model_bytes: Positive = 8 * 1024 * MiB  # the largest model registry version (a declared size above: 413)
    # Redis with replicas and Sentinel (shared/redis_connect.py): the sentinels' host:port, the name
    # they know the primary by, and how many replicas must hold a submission before its 202
    # comma-separated in FLEETTUNE_REDIS_SENTINELS (NoDecode: not JSON, as pydantic-settings reads a tuple)
    redis_sentinels: Annotated[tuple[Annotated[str, AfterValidator(_host_port)], ...], NoDecode] = ()
    redis_service: str = "fleettune"
    redis_min_replicas: int = Field(0, ge=0)
    redis_wait_ms: Positive = 1000  # how long a submit waits for them (503 past it: the device retries)

    def __init__(self, **values: Any) -> None:
        """Settings from keyword arguments (field names), the rest their defaults."""
        try:
            super().__init__(**values)
        except ValidationError as exc:
            name = _naming.get()
            raise ConfigError.from_validation(exc, name=lambda loc: name(str(loc[0]))) from None

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   **_: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)  # the keywords only: from_env is the one reader of the environment

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return tuple(a.strip() for a in value.split(",") if a.strip()) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        name = _naming.get()
        if self.visibility_timeout_s <= self.task_time_limit_s:
            # Redis redelivers unacked messages after the visibility timeout; a shorter one would
            # hand a still-running task to a second worker.
            raise _invalid(f"{name('visibility_timeout_s')}={self.visibility_timeout_s}: the visibility timeout "
                           f"must exceed the task time limit ({name('task_time_limit_s')}={self.task_time_limit_s})")
        if self.message_ttl_s < max(3600, 2 * self.redrive_after_s):
            # an outcome that expired while its message can still come back would count it again
            raise _invalid(f"{name('message_ttl_s')}={self.message_ttl_s}: the message TTL must be at least an hour "
                           f"and twice the re-drive delay ({name('redrive_after_s')}={self.redrive_after_s:g})")
        return self

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """The settings that FLEETTUNE_* variables of `env` (default: the process's) set; defaults elsewhere."""
        values = _MappingEnv(cls, os.environ if env is None else env)()
        naming = _naming.set(env_name)
        try:
            return cls(**values)
        finally:
            _naming.reset(naming)


def env_name(field: str) -> str:
    """The environment variable that sets `field` (a validation alias is one already)."""
    info = Settings.model_fields.get(field)
    if info is not None and isinstance(info.validation_alias, str):
        return info.validation_alias
    return field if field.startswith(PREFIX) else PREFIX + field.upper()


def _visibility(task_time_limit_s: int) -> int:
    return max(2 * task_time_limit_s, task_time_limit_s + 60)


def _invalid(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_settings", "{message}", {"message": message})


class _MappingEnv(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        self._env = env
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        fold = (lambda k: k) if self.case_sensitive else str.lower
        return {fold(k): v for k, v in self._env.items() if not (self.env_ignore_empty and v == "")}
