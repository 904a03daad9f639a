"""The API process's service objects, built once from a Runtime and the way it enqueues envelopes."""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable

from fleettune.shared import keys
from fleettune.shared.control.auth import Tokens
from fleettune.shared.control.devices import Devices
from fleettune.shared.control.gateway import Enqueue, Gateway, Publisher
from fleettune.shared.control.presign import LocalPresigner, Presigner, S3Presigner
from fleettune.shared.control.registry import ModelRegistry
from fleettune.shared.control.rollouts import Rollouts
from fleettune.shared.control.tiers import Deployment
from fleettune.shared.control.sessions import Control
from fleettune.shared.runtime import Runtime
from fleettune.shared.storage import LocalObjectStore


@dataclasses.dataclass
class Services:
    runtime: Runtime
    tokens: Tokens
    presigner: Presigner
    gateway: Gateway
    devices: Devices
    control: Control
    registry: ModelRegistry

    @property
    def rollouts(self) -> Rollouts:
        return self.gateway.rollouts

    @property
    def deployment(self) -> Deployment:
        return self.gateway.deployment

    @classmethod
    def build(cls, runtime: Runtime, enqueue: Enqueue, clock: Callable[[], float] = time.time,
              publisher: Publisher | None = None) -> Services:
        settings, state = runtime.settings, runtime.state
        presigner = presigner_for(runtime)
        tokens = Tokens(runtime.redis, clock)
        registry = ModelRegistry(runtime.redis, runtime.store, presigner, settings, clock)
        return cls(
            runtime=runtime, tokens=tokens, presigner=presigner,
            gateway=Gateway(state, presigner, settings, enqueue, clock, publisher),
            devices=Devices(state, tokens),
            control=Control(state, runtime.coordinator, clock, registered_model=registry.record),
            registry=registry,
        )

    @property
    def local(self) -> LocalPresigner | None:
        return self.presigner if isinstance(self.presigner, LocalPresigner) else None


def presigner_for(runtime: Runtime) -> Presigner:
    """S3 signs with the store's credentials; the local store with a key shared through Redis."""
    settings = runtime.settings
    if settings.s3_endpoint and not isinstance(runtime.store, LocalObjectStore):
        scheme = "https" if settings.s3_secure else "http"
        public = settings.s3_public_endpoint
        return S3Presigner(f"{scheme}://{settings.s3_endpoint}", settings.s3_access_key, settings.s3_secret_key,
                           settings.s3_bucket, settings.s3_region,
                           public_url=public if public is None or "://" in public else f"{scheme}://{public}")
    runtime.redis.set(keys.SIGNING_KEY, secrets.token_bytes(32), nx=True)  # every API process shares one
    return LocalPresigner(runtime.redis.get(keys.SIGNING_KEY))
