"""The service handles one process needs, built from Settings (or injected by tests and the demo)."""

from __future__ import annotations

import dataclasses
import functools

import redis

from fleettune.shared import redis_connect
from fleettune.shared.federation import FederationConfig
from fleettune.shared.pipeline.folding import PartialFolder
from fleettune.shared.pipeline.ingest import Ingestor
from fleettune.shared.state.ledger import Ledger
from fleettune.shared.metrics import Metrics, process_metrics
from fleettune.shared.pipeline.rounds import RoundCoordinator
from fleettune.shared.settings import Settings
from fleettune.shared.state import FederationState
from fleettune.shared.storage import ObjectStore, open_store


@dataclasses.dataclass
class Runtime:
    settings: Settings
    redis: redis.Redis
    store: ObjectStore
    _evaluators: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> Runtime:
        if not settings.redis_url:
            raise ValueError("FLEETTUNE_REDIS_URL is not set; only `fleettune demo` runs without Redis")
        client = redis_connect.connect(settings, health_check_interval=30)
        return cls(settings, client, open_store(settings))

    @functools.cached_property
    def state(self) -> FederationState:
        s = self.settings
        return FederationState(self.redis, s.deadletter_maxlen, s.retention_s, s.message_ttl_s)

    @functools.cached_property
    def ingestor(self) -> Ingestor:
        return Ingestor(self.state, self.store, self.settings, folder=self.folder)

    @functools.cached_property
    def folder(self) -> PartialFolder:
        s = self.settings
        return PartialFolder(self.state, self.store, s.fold_batch, s.fold_tail, s.fold_idle_s)

    @functools.cached_property
    def coordinator(self) -> RoundCoordinator:
        return RoundCoordinator(self.state, self.store, self.settings, evaluator_for=self.evaluator)

    @functools.cached_property
    def ledger(self) -> Ledger:
        return Ledger(self.redis, self.settings.redrive_after_s, self.settings.message_ttl_s)

    @functools.cached_property
    def metrics(self) -> Metrics:
        return process_metrics()

    def evaluator(self, config: FederationConfig):
        """One Evaluator per (evaluation, adapter) config in this process: loading the base model is slow."""
        from fleettune.shared.pipeline.evaluation import Evaluator

        key = (config.evaluation, config.adapter)
        if key not in self._evaluators:
            self._evaluators[key] = Evaluator(config.evaluation, config.adapter)
        return self._evaluators[key]
