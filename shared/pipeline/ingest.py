"""Ingest one envelope: validate, verify, clip, and record it exactly once."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable

import redis

from fleettune.shared.protocol import envelope as envelope_codec
from fleettune.shared import keys
from fleettune.shared.strategies.fedavg import clip_scale, update_norm
from fleettune.shared.protocol.envelope import Envelope
from fleettune.shared.errors import ObjectNotFound, RejectReason, Rejected, StorageUnavailable
from fleettune.shared.federation import FederationConfig
from fleettune.shared.pipeline.folding import PartialFolder
from fleettune.shared.protocol.safetensors_reader import parse
from fleettune.shared.settings import Settings
from fleettune.shared.state import ACCEPTED, REDELIVERED, FederationState, UpdateRecord
from fleettune.shared.storage import ObjectStore
from fleettune.shared.strategies.partial import weight, weight_cap

log = logging.getLogger(__name__)
# Failures of our services, not of the update: retry, never reject.
TRANSIENT = (StorageUnavailable, redis.ConnectionError, redis.TimeoutError)


@dataclasses.dataclass(frozen=True)
class IngestResult:
    outcome: str  # accepted | rejected | redelivered
    federation: str | None = None
    round: int | None = None
    device: str | None = None
    reason: RejectReason | None = None
    detail: str = ""
    norm: float | None = None
    clip_scale: float | None = None
    nbytes: int = 0
    train_seconds: float | None = None
    round_ready: bool = False  # every selected device has reported: close the round now
    tier: str = "default"


class Ingestor:
    def __init__(self, state: FederationState, store: ObjectStore, settings: Settings,
                 clock: Callable[[], float] = time.time, folder: PartialFolder | None = None) -> None:
        self.state = state
        self.folder = folder  # folds accepted updates into partial sums (linear rules); None: the close reads all
        self.store = store
        self.settings = settings
        self.clock = clock
        self._configs: dict[tuple[str, int], FederationConfig] = {}  # each revision is immutable
        self._feds: set[str] = set()  # federations seen to exist

    def ingest(self, raw: object) -> IngestResult:
        digest = _digest(raw)
        settled = self.state.accounting.outcome(digest)
        if settled is not None:
            self.state.accounting.count_redelivery()
            return IngestResult(REDELIVERED, detail=settled)
        try:
            env = envelope_codec.decode(raw, self.settings.max_envelope_bytes)
        except Rejected as rej:
            return self._reject(digest, rej, None)
        try:
            result = self._ingest(digest, env)
        except Rejected as rej:
            result = self._reject(digest, rej, env)
        except TRANSIENT:
            raise  # the task layer retries these with backoff
        except Exception as exc:  # a bug must not lose the update or kill the worker
            log.exception("ingest of %s/%s/%s failed", env.federation, env.round, env.device)
            return self._reject(digest, Rejected(RejectReason.INTERNAL_ERROR, type(exc).__name__), env)
        if result.round_ready and self.folder is not None:
            self.folder.flush(result.federation, result.round)  # the close is asked for next: commit first
        return result

    def _config(self, fed: str, revision: int | None) -> FederationConfig:
        """The config the round runs under (the one in force when the round is unknown)."""
        if (fed, revision) not in self._configs:
            config = self.state.federations.config(fed, revision)
            if config is None:
                raise Rejected(RejectReason.UNKNOWN_FEDERATION, fed)
            if revision is None:
                return config
            self._configs[(fed, revision)] = config
        return self._configs[(fed, revision)]

    def _known(self, fed: str) -> bool:
        if fed not in self._feds and self.state.federations.config(fed) is not None:
            self._feds.add(fed)
        return fed in self._feds

    def _ingest(self, digest: str, env: Envelope) -> IngestResult:
        if not self._known(env.federation):
            raise Rejected(RejectReason.UNKNOWN_FEDERATION, env.federation)
        if env.object_key != keys.update_object(env.federation, env.round, env.device):
            raise Rejected(RejectReason.BAD_OBJECT_KEY, "key does not match federation, round and device")
        config, tier = self._check_round(env)
        policy = config.policy

        try:
            blob = self.store.get(env.object_key, self.settings.max_update_bytes)
        except ObjectNotFound:
            raise Rejected(RejectReason.OBJECT_MISSING, env.object_key) from None
        if hashlib.sha256(blob).hexdigest() != env.sha256:
            raise Rejected(RejectReason.SHA256_MISMATCH, "object bytes do not match the envelope")
        rank = config.tier_ranks.get(tier, 0)  # a tier of lower rank sends its own, smaller layout
        tensors = parse(blob, config.update_tensors_for(rank or config.adapter.rank), self.settings.max_header_bytes)
        norm = update_norm(tensors)
        try:
            scale = clip_scale(norm, policy.max_update_norm)
        except ValueError:
            raise Rejected(RejectReason.NON_FINITE, "update holds NaN or Inf") from None

        record = UpdateRecord(
            device=env.device, object_key=env.object_key, sha256=env.sha256,
            num_samples=min(env.num_samples, policy.max_num_samples), claimed_samples=env.num_samples,
            norm=norm, clip_scale=scale, train_seconds=env.train_seconds, metrics=env.metrics,
            accepted_at=self.clock(), rank=rank,
        )
        outcome, count, cohort, reference = self.state.accounting.accept(digest, env.federation, env.round, record)
        if outcome == REDELIVERED:
            return IngestResult(REDELIVERED, env.federation, env.round, env.device)
        if outcome != ACCEPTED:
            raise Rejected(RejectReason(outcome), "round closed while the update was checked")
        if self.folder is not None and config.aggregation.folds:
            try:
                agg = config.aggregation
                w = weight(record.num_samples, weight_cap(reference, agg.max_weight_ratio, agg.dp), agg.dp)
                self.folder.fold(config, env.round, record, tensors, w, reference is None, count, cohort)
            except Exception:  # accepted stands: the close reads an update no partial holds
                log.exception("fold of %s/%s/%s failed", env.federation, env.round, env.device)
        return IngestResult(
            ACCEPTED, env.federation, env.round, env.device, norm=norm, clip_scale=scale,
            nbytes=len(blob), train_seconds=env.train_seconds, round_ready=cohort > 0 and count >= cohort,
            tier=tier,
        )

    def _check_round(self, env: Envelope) -> tuple[FederationConfig, str]:
        """Cheap checks before any download; the accept transaction re-checks what can change."""
        current, info, selected, submitted, tier = self.state.rounds.precheck(env.federation, env.round, env.device)
        config = self._config(env.federation, info.config_rev if info else None)
        if env.round > current:
            raise Rejected(RejectReason.FUTURE_ROUND, f"round {env.round} > current {current}")
        if info is None or info.status != "open":
            raise Rejected(RejectReason.STALE_ROUND, f"round {env.round} is {info.status if info else 'unknown'}")
        if not selected:
            raise Rejected(RejectReason.NOT_SELECTED, f"{env.device} is not in round {env.round}'s cohort")
        if env.base_version != info.base_version:
            raise Rejected(RejectReason.WRONG_BASE_VERSION, f"trained from v{env.base_version}, round uses v{info.base_version}")
        if env.num_samples < config.policy.min_samples_per_client:
            raise Rejected(RejectReason.TOO_FEW_SAMPLES, f"{env.num_samples} < {config.policy.min_samples_per_client}")
        if submitted:
            raise Rejected(RejectReason.ALREADY_SUBMITTED, f"{env.device} already has an update in round {env.round}")
        return config, tier

    def _reject(self, digest: str, rej: Rejected, env: Envelope | None) -> IngestResult:
        # Count under the federation only once it is known to exist: unknown names stay unbounded.
        fed = env.federation if env and rej.reason != RejectReason.UNKNOWN_FEDERATION and self._known(env.federation) else None
        fresh, ready = self.state.accounting.reject(
            digest, rej.reason, rej.detail, self.clock(), fed=fed,
            round_no=env.round if env else None, device=env.device if env else None,
        )
        if not fresh:
            return IngestResult(REDELIVERED, fed)
        return IngestResult("rejected", fed, env.round if env else None, env.device if env else None,
                            reason=rej.reason, detail=rej.detail, round_ready=ready)


def _digest(raw: object) -> str:
    if isinstance(raw, (bytes, bytearray)):
        return envelope_codec.digest(bytes(raw))
    # Not bytes at all: still give it a stable identity so a redelivery is not counted twice.
    text = repr(raw)
    return hashlib.sha256(f"{type(raw).__name__}:{len(text)}:{text[:4096]}".encode()).hexdigest()
