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
from fleettune.shared.errors import BufferClosing, ObjectNotFound, RejectReason, Rejected, StorageUnavailable
from fleettune.shared.federation import FederationConfig
from fleettune.shared.pipeline.folding import PartialFolder
from fleettune.shared.protocol.compression import read_update
from fleettune.shared.settings import Settings
from fleettune.shared.state import ACCEPTED, REDELIVERED, FederationState, RoundInfo, UpdateRecord
from fleettune.shared.storage import ObjectStore
from fleettune.shared.strategies.partial import record_weight, weight_cap

log = logging.getLogger(__name__)
# Failures of our services, not of the update: retry, never reject.
TRANSIENT = (StorageUnavailable, redis.ConnectionError, redis.TimeoutError, BufferClosing)


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
    staleness: int | None = None  # async rounds: versions published since the update's base
    encoding: str | None = None  # how the accepted update was coded (protocol.compression)


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
        precheck = self.state.rounds.precheck(env.federation, env.round, env.device)
        if precheck[1] is not None and precheck[1].mode == "async":
            config, tier, target, staleness, joins = self._check_buffer(env, *precheck)
        else:
            (config, tier), target, staleness, joins = self._check_round(env, *precheck), env.round, None, None
        policy = config.policy

        try:
            blob = self.store.get(env.object_key, self.settings.max_update_bytes)
        except ObjectNotFound:
            raise Rejected(RejectReason.OBJECT_MISSING, env.object_key) from None
        if hashlib.sha256(blob).hexdigest() != env.sha256:
            raise Rejected(RejectReason.SHA256_MISMATCH, "object bytes do not match the envelope")
        rank = config.tier_ranks.get(tier, 0)  # a tier of lower rank sends its own, smaller layout
        tensors, encoding = read_update(blob, config.update_tensors_for(rank or config.adapter.rank),
                                        self.settings.max_header_bytes)
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
            **({"staleness": staleness, "staleness_weight": policy.staleness_weight(staleness)} if staleness else {}),
            **({"participation": policy.participation_weight(joins[1])} if joins else {}),
        )
        asynchronous = staleness is not None
        outcome, count, cohort, reference = self.state.accounting.accept(
            digest, env.federation, target, record, received_round=env.round,
            base_version=env.base_version if asynchronous else None, joins=joins[0] if joins else None)
        if outcome == REDELIVERED:
            return IngestResult(REDELIVERED, env.federation, target, env.device)
        if outcome == RejectReason.STALE_ROUND.value and asynchronous:
            raise BufferClosing(f"{env.federation} buffer {target} closed while the update was checked")
        if outcome != ACCEPTED:
            raise Rejected(RejectReason(outcome), "round closed while the update was checked")
        if self.folder is not None and config.aggregation.folds:
            try:
                agg = config.aggregation
                w = record_weight(record, weight_cap(reference, agg.max_weight_ratio, agg.dp), agg.dp)
                self.folder.fold(config, target, record, tensors, w, reference is None, count, cohort)
            except Exception:  # accepted stands: the close reads an update no partial holds
                log.exception("fold of %s/%s/%s failed", env.federation, target, env.device)
        ready = count >= policy.buffer_size if asynchronous else cohort > 0 and count >= cohort
        return IngestResult(
            ACCEPTED, env.federation, target, env.device, norm=norm, clip_scale=scale,
            nbytes=len(blob), train_seconds=env.train_seconds, round_ready=ready, tier=tier, staleness=staleness,
            encoding=encoding,
        )

    def _check_buffer(self, env: Envelope, current: int, info: RoundInfo, selected: bool, submitted: bool,
                      tier: str) -> tuple[FederationConfig, str, int, int, tuple[int, int]]:
        """An async round's checks: (config, tier, the buffer it joins, its staleness, (that
        buffer's base version, versions since the device's previous update joined one)).

        The update joins the buffer open now, whichever round it checked in to. It must have
        trained from the version that round served, no newer than the buffer's base and at most
        max_staleness versions older; the accept script refuses a second update for one base.
        A device's first update counts the versions since v0 as its interval.
        """
        fed = env.federation
        if env.round > current:
            raise Rejected(RejectReason.FUTURE_ROUND, f"round {env.round} > current {current}")
        if not selected:
            raise Rejected(RejectReason.NOT_SELECTED, f"{env.device} did not check in to round {env.round}")
        buffer = info if current == env.round else self.state.rounds.round_info(fed, current)
        if buffer is not None and env.base_version > buffer.base_version:
            raise Rejected(RejectReason.FUTURE_BASE_VERSION, f"v{env.base_version} > newest v{buffer.base_version}")
        if env.base_version != info.base_version:
            raise Rejected(RejectReason.WRONG_BASE_VERSION,
                           f"trained from v{env.base_version}, round {env.round} served v{info.base_version}")
        if buffer is None or buffer.status != "open":
            if self.state.federations.status(fed).get("status") == "active":
                raise BufferClosing(f"{fed} buffer {current} is {buffer.status if buffer else 'unopened'}")
            raise Rejected(RejectReason.STALE_ROUND, f"{fed} has no open buffer: it is not training")
        config = self._config(fed, buffer.config_rev)
        staleness = buffer.base_version - env.base_version
        if staleness > config.policy.max_staleness:
            raise Rejected(RejectReason.TOO_STALE,
                           f"trained from v{env.base_version}, {staleness} versions old > max_staleness "
                           f"{config.policy.max_staleness}")
        if env.num_samples < config.policy.min_samples_per_client:
            raise Rejected(RejectReason.TOO_FEW_SAMPLES, f"{env.num_samples} < {config.policy.min_samples_per_client}")
        pipe = self.state.r.pipeline(transaction=False)  # one round trip for both of the device's marks
        pipe.hget(keys.fed_async_bases(fed), env.device)
        pipe.hget(keys.fed_async_joined(fed), env.device)
        last, joined = pipe.execute()
        if last is not None and int(last) >= env.base_version:
            raise Rejected(RejectReason.DUPLICATE_BASE_VERSION,
                           f"{env.device} already has an update from v{int(last)}")
        interval = buffer.base_version - (int(joined) if joined is not None else -1)
        return config, tier, buffer.round, staleness, (buffer.base_version, interval)

    def _check_round(self, env: Envelope, current: int, info: RoundInfo | None, selected: bool, submitted: bool,
                     tier: str) -> tuple[FederationConfig, str]:
        """Cheap checks before any download; the accept transaction re-checks what can change."""
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
