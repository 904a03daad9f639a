"""The API process's service objects, built once from a Runtime and the way it enqueues envelopes."""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable

from starlette.concurrency import run_in_threadpool

from fleettune.shared import keys
from fleettune.shared.control.auth import Tokens
from fleettune.shared.control.devices import Devices
from fleettune.shared.control.gateway import Enqueue, Gateway, Publisher, Receipt
from fleettune.shared.control.presign import LocalPresigner, Presigner, S3Presigner
from fleettune.shared.control.model_registry import ModelRegistry
from fleettune.shared.control.rollouts import Rollouts
from fleettune.shared.control.tiers import Deployment
from fleettune.shared.control.plane import Control
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

    _aredis: object = dataclasses.field(default=None, repr=False)

    @property
    def aredis(self):
        """A redis.asyncio client for the hot paths (auth, rate limit, submit); None in embedded mode,
        where state is fakeredis and those calls go to the thread pool instead."""
        if self._aredis is None and self.runtime.settings.redis_url:
            from fleettune.shared import redis_connect

            self._aredis = redis_connect.connect_async(self.runtime.settings)
        return self._aredis

    async def submit(self, fed: str, device: str, fields: dict) -> Receipt:
        if self.aredis is not None and self.gateway.publisher is not None:
            return await self.gateway.submit_async(self.aredis, fed, device, fields)
        return await run_in_threadpool(self.gateway.submit, fed, device, fields)

    @property
    def rollouts(self) -> Rollouts:
        return self.gateway.rollouts

    @property
    def deployment(self) -> Deployment:
        return self.gateway.deployment

    @classmethod
    def build(cls, runtime: Runtime, enqueue: Enqueue, clock: Callable[[], float] = time.time,
              publisher: Publisher | None = None, begin: Callable[[str], object] | None = None) -> Services:
        settings, state = runtime.settings, runtime.state
        presigner = presigner_for(runtime)
        tokens = Tokens(runtime.redis, clock)
        registry = ModelRegistry(runtime.redis, runtime.store, presigner, settings, clock)
        return cls(
            runtime=runtime, tokens=tokens, presigner=presigner,
            gateway=Gateway(state, presigner, settings, enqueue, clock, publisher, base_download=registry.base_download,
                            secure=runtime.coordinator.secure),
            devices=Devices(state, tokens),
            control=Control(state, runtime.coordinator, clock, registered_model=registry.record,
                            max_update_bytes=settings.max_update_bytes, begin=begin),
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
