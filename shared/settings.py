"""One frozen settings object, built from FLEETTUNE_* environment variables."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

from fleettune.shared.errors import ConfigError

MiB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Settings:
    """Where the services are and how much a device may send.

    `redis_url` None means "no Redis": only the embedded demo runs then.
    `s3_endpoint` None means a local-directory object store under `data_dir`.
    """

    redis_url: str | None = None
    s3_endpoint: str | None = None
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_bucket: str = "fleettune"
    s3_secure: bool = False
    data_dir: Path = Path(".fleettune")
    max_update_bytes: int = 64 * MiB
    max_envelope_bytes: int = 4096
    max_header_bytes: int = 1 * MiB
    task_time_limit_s: int = 300
    visibility_timeout_s: int = 600
    deadletter_maxlen: int = 100_000
    sweep_interval_s: float = 5.0  # how often beat looks for rounds past their deadline
    restore_interval_s: int = 10  # how often workers look for messages of dead workers to requeue
    torch_threads: int = 1  # per worker process: prefork already runs one process per core
    metrics_port: int = 0  # the worker's /metrics; 0 serves none
    metrics_addr: str = "127.0.0.1"  # 0.0.0.0 where Prometheus scrapes from another host
    s3_public_endpoint: str | None = None  # the S3 URL devices reach, for presigning (default: s3_endpoint)
    s3_region: str = "us-east-1"
    device_rate_limit: int = 120  # requests a device may make per rate window (429 past it)
    rate_window_s: int = 60
    url_ttl_s: int = 3600  # presigned GETs live this long; a PUT lives until its round's deadline
    multipart_threshold_bytes: int = 64 * MiB  # registry uploads above this go up in parts
    redrive_after_s: float = 60.0  # a received message with no outcome after this is enqueued again
    retention_s: float = 7 * 86400.0  # update objects and per-round sets live this long after their round
    # a message's outcome and ledger entry (about 1.4 KB of Redis per message) live this long: a
    # redelivery or a device's retry within it is answered, not counted again
    message_ttl_s: int = 7 * 86400
    deadline_grace_s: float = 180.0  # how long a close waits past the deadline for on-time messages in flight
    max_retries: int = 10  # a task's retries through an outage of S3 or Redis, with exponential backoff ...
    retry_backoff_max_s: int = 60  # ... capped at this; past the budget the ledger re-drives the message
    # devices hold only write-once (If-None-Match) upload URLs, so an accepted object's bytes cannot
    # change: the close trusts the sha256 ingest verified instead of hashing every object again
    updates_write_once: bool = True
    fold_batch: int = 64  # an ingest process commits its partial sum after this many updates ...
    fold_tail: int = 8  # ... or at every update once the round is within this many devices of complete ...
    fold_idle_s: float = 0.5  # ... or once no update arrived for this long
    split_url: str | None = None  # the split-learning server the gateway forwards devices' steps to
    split_rate_limit: int = 6000  # split steps a device may send per rate window (a step per batch)
    # request bodies, bounded while they stream in (413 past the bound; nothing is read before auth)
    max_device_body_bytes: int = 16 * 1024  # check-in, upload-url, submit, reports: JSON of a few fields
    max_operator_body_bytes: int = 1 * MiB  # every other JSON route
    max_model_bytes: int = 8 * 1024 * MiB  # the largest model registry version (a declared size above: 413)
    # Redis with replicas and Sentinel (shared/redis_connect.py): the sentinels' host:port, the name
    # they know the primary by, and how many replicas must hold a submission before its 202
    redis_sentinels: tuple[str, ...] = ()
    redis_service: str = "fleettune"
    redis_min_replicas: int = 0
    redis_wait_ms: int = 1000  # how long a submit waits for them (503 past it: the device retries)

    def __post_init__(self) -> None:
        if self.visibility_timeout_s <= self.task_time_limit_s:
            # Redis redelivers unacked messages after the visibility timeout; a shorter one would
            # hand a still-running task to a second worker.
            raise ConfigError(
                f"visibility timeout ({self.visibility_timeout_s}s) must exceed the task time "
                f"limit ({self.task_time_limit_s}s)"
            )
        if self.message_ttl_s < max(3600, 2 * self.redrive_after_s):
            # an outcome that expired while its message can still come back would count it again
            raise ConfigError(f"message TTL ({self.message_ttl_s}s) must be at least an hour and twice the re-drive delay")
        for address in self.redis_sentinels:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"FLEETTUNE_REDIS_SENTINELS: {address!r} is not host:port")
        if self.redis_min_replicas < 0 or self.redis_wait_ms <= 0:
            raise ConfigError("FLEETTUNE_REDIS_MIN_REPLICAS must be >= 0 and FLEETTUNE_REDIS_WAIT_MS positive")
        for name in ("max_update_bytes", "max_envelope_bytes", "max_header_bytes", "task_time_limit_s",
                     "device_rate_limit", "rate_window_s", "url_ttl_s", "multipart_threshold_bytes", "fold_batch",
                     "fold_idle_s", "max_device_body_bytes", "max_operator_body_bytes", "max_model_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            value = env.get(f"FLEETTUNE_{name}")
            return value if value not in (None, "") else None

        def integer(name: str, default: int) -> int:
            raw = get(name)
            if raw is None:
                return default
            try:
                return int(raw)
            except ValueError:
                raise ConfigError(f"FLEETTUNE_{name} must be an integer, got {raw!r}") from None

        def real(name: str, default: float) -> float:
            raw = get(name)
            try:
                return default if raw is None else float(raw)
            except ValueError:
                raise ConfigError(f"FLEETTUNE_{name} must be a number, got {raw!r}") from None

        time_limit = integer("TASK_TIME_LIMIT", cls.task_time_limit_s)
        return cls(
            redis_url=get("REDIS_URL"),
            s3_endpoint=get("S3_ENDPOINT"),
            s3_access_key=get("S3_ACCESS_KEY") or "",
            s3_secret_key=get("S3_SECRET_KEY") or "",
            s3_bucket=get("S3_BUCKET") or cls.s3_bucket,
            s3_secure=(get("S3_SECURE") or "false").lower() in ("1", "true", "yes"),
            data_dir=Path(get("DATA_DIR") or cls.data_dir),
            max_update_bytes=integer("MAX_UPDATE_BYTES", cls.max_update_bytes),
            max_envelope_bytes=integer("MAX_ENVELOPE_BYTES", cls.max_envelope_bytes),
            max_header_bytes=integer("MAX_HEADER_BYTES", cls.max_header_bytes),
            max_device_body_bytes=integer("MAX_DEVICE_BODY_BYTES", cls.max_device_body_bytes),
            max_operator_body_bytes=integer("MAX_OPERATOR_BODY_BYTES", cls.max_operator_body_bytes),
            max_model_bytes=integer("MAX_MODEL_BYTES", cls.max_model_bytes),
            task_time_limit_s=time_limit,
            visibility_timeout_s=integer("VISIBILITY_TIMEOUT", max(2 * time_limit, time_limit + 60)),
            deadletter_maxlen=integer("DEADLETTER_MAXLEN", cls.deadletter_maxlen),
            sweep_interval_s=real("SWEEP_INTERVAL", cls.sweep_interval_s),
            restore_interval_s=integer("RESTORE_INTERVAL", cls.restore_interval_s),
            torch_threads=integer("TORCH_THREADS", cls.torch_threads),
            metrics_port=integer("METRICS_PORT", cls.metrics_port),
            metrics_addr=get("METRICS_ADDR") or cls.metrics_addr,
            s3_public_endpoint=get("S3_PUBLIC_ENDPOINT"),
            s3_region=get("S3_REGION") or cls.s3_region,
            device_rate_limit=integer("DEVICE_RATE_LIMIT", cls.device_rate_limit),
            rate_window_s=integer("RATE_WINDOW", cls.rate_window_s),
            url_ttl_s=integer("URL_TTL", cls.url_ttl_s),
            multipart_threshold_bytes=integer("MULTIPART_THRESHOLD", cls.multipart_threshold_bytes),
            redrive_after_s=real("REDRIVE_AFTER", cls.redrive_after_s),
            retention_s=real("RETENTION", cls.retention_s),
            message_ttl_s=integer("MESSAGE_TTL", cls.message_ttl_s),
            deadline_grace_s=real("DEADLINE_GRACE", cls.deadline_grace_s),
            max_retries=integer("MAX_RETRIES", cls.max_retries),
            retry_backoff_max_s=integer("RETRY_BACKOFF_MAX", cls.retry_backoff_max_s),
            updates_write_once=(get("UPDATES_WRITE_ONCE") or "true").lower() in ("1", "true", "yes"),
            fold_batch=integer("FOLD_BATCH", cls.fold_batch),
            fold_tail=integer("FOLD_TAIL", cls.fold_tail),
            fold_idle_s=real("FOLD_IDLE", cls.fold_idle_s),
            split_url=get("SPLIT_URL"),
            split_rate_limit=integer("SPLIT_RATE_LIMIT", cls.split_rate_limit),
            redis_sentinels=tuple(a.strip() for a in (get("REDIS_SENTINELS") or "").split(",") if a.strip()),
            redis_service=get("REDIS_SERVICE") or cls.redis_service,
            redis_min_replicas=integer("REDIS_MIN_REPLICAS", cls.redis_min_replicas),
            redis_wait_ms=integer("REDIS_WAIT_MS", cls.redis_wait_ms),
        )
