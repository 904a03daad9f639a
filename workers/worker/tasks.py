"""Celery tasks: decode, call shared/, schedule follow-ups. No domain logic lives here."""

from __future__ import annotations

import hashlib
import logging
import time
import uuid

import torch
from celery import Task, shared_task
from celery.signals import worker_process_init, worker_process_shutdown

from fleettune.shared import keys
from fleettune.shared.state import broker
from fleettune.shared.pipeline import retention
from fleettune.shared.control.rollouts import Rollouts
from fleettune.shared.control.model_registry import ModelRegistry
from fleettune.shared.control.tiers import Deployment
from fleettune.shared.export import exporter
from fleettune.shared.export.tracking import Exports
from fleettune.shared.protocol import versions
from fleettune.shared.protocol.runtimes import FORMATS
from fleettune.shared.pipeline.distill import distill_version
from fleettune.shared.pipeline.evaluation import evaluate_version
from fleettune.shared.pipeline.ingest import TRANSIENT
from fleettune.shared.state.lease import Lease
from fleettune.shared.pipeline.rounds import CLOSED, FAILED
from fleettune.shared.runtime import Runtime
from fleettune.workers.worker.app import INGEST_QUEUE, app, enqueuer, runtime_of

log = logging.getLogger(__name__)
_settings = app.fleettune_settings
REDRIVE_LOCK_S = 60  # lapses by itself if the sweep holding it dies
START_GRACE_S = 30  # a start not done this long after the API recorded it is sent again
RETRY = dict(autoretry_for=TRANSIENT, retry_backoff=True, retry_backoff_max=_settings.retry_backoff_max_s,
             retry_jitter=True, max_retries=_settings.max_retries)


@worker_process_init.connect
def _set_torch_threads(**_) -> None:
    """A small fixed thread count per pool process; torch's default oversubscribes the cores."""
    torch.set_num_threads(app.fleettune_settings.torch_threads)


@worker_process_shutdown.connect
def _commit_partials(**_) -> None:
    """A process stopping cleanly commits its partial sums (one killed leaves their updates to the close)."""
    if app.fleettune_runtime is not None and "folder" in vars(app.fleettune_runtime):
        app.fleettune_runtime.folder.flush()


class FleetTask(Task):
    """Gives each task the process's Runtime, built on first use (after the prefork fork)."""

    @property
    def runtime(self) -> Runtime:
        return runtime_of(self.app)


class IngestTask(FleetTask):
    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        """Retries ran out (a long outage): say so in the dead letters; the ledger re-drives it later."""
        raw = args[0] if len(args) == 1 and isinstance(args[0], bytes) else repr(args)[:200].encode()
        self.runtime.state.accounting.note_retries_exhausted(hashlib.sha256(raw).hexdigest(), f"{type(exc).__name__}: {exc}",
                                                  time.time())


@shared_task(base=IngestTask, bind=True, name="fleettune.ingest", **RETRY)
def ingest(self: FleetTask, *args, **kwargs) -> str:
    # any arguments at all: a message of the wrong shape is dead-lettered by name, never dropped by Celery
    raw = args[0] if len(args) == 1 and not kwargs else {"args": args, "kwargs": kwargs}
    result = self.runtime.ingestor.ingest(raw)
    self.runtime.metrics.observe_ingest(result)
    if result.outcome == "rejected":
        log.info("rejected %s/%s/%s: %s %s", result.federation, result.round, result.device,
                 result.reason.value, result.detail)
    if result.round_ready:
        close_round.delay(result.federation, result.round)
    return result.outcome


@shared_task(base=FleetTask, bind=True, name="fleettune.start", **RETRY)
def start(self: FleetTask, fed: str) -> int:
    """A start the API recorded (a training session, a resume): v0 if needed, then the round opens."""
    info = self.runtime.coordinator.start_requested(fed)
    if info is not None:
        log.info("%s round %s opened on version %s", fed, info.round, info.base_version)
    return info.round if info is not None else 0


@shared_task(base=FleetTask, bind=True, name="fleettune.close_round", **RETRY)
def close_round(self: FleetTask, fed: str, round_no: int) -> str:
    # the task id owns the close's lease: a redelivery of this message resumes at once, while any
    # other close of the round waits for the lease to expire
    result = self.runtime.coordinator.close(fed, round_no, owner=self.request.id)
    self.runtime.metrics.observe_close(fed, result, time.time())
    if result.decision in (CLOSED, FAILED):
        log.info("%s round %s %s -> version %s %s", fed, round_no, result.decision, result.version, result.reason)
    if result.decision == CLOSED and result.manifest is not None:
        if self.runtime.state.federations.config(fed).evaluation:
            evaluate.delay(fed, result.version)
        config, exports = self.runtime.state.federations.config(fed), Exports(self.runtime.redis)
        serving = Rollouts(self.runtime.state).serving(fed)  # what devices run until a rollout moves it
        for fmt in config.exports if config else ():  # on-device runtimes' formats, off the round's path
            for version in sorted({result.version, serving}):
                if exports.mark_due(fed, version, fmt, at=time.time()):  # once, however often the close is redone
                    export.delay(fed, version, fmt)
        deployment = Deployment(self.runtime.redis)
        for tier in deployment.distilled_tiers(fed):  # cascading tiers: each new version, for each smaller base
            deployment.mark_due(fed, result.version, tier, at=time.time())
            distill.delay(fed, result.version, tier)
    return result.decision


@shared_task(base=FleetTask, bind=True, name="fleettune.evaluate", **RETRY)
def evaluate(self: FleetTask, fed: str, version: int) -> float:
    """Held-out perplexity (and forgetting) of a newly published version."""
    runtime = self.runtime
    result = evaluate_version(runtime.state, runtime.store, runtime.settings, fed, version, runtime.evaluator)
    log.info("%s v%s held-out perplexity %.2f %s", fed, version, result["heldout_mean"], result.get("guard", ""))
    return result["heldout_mean"]


@shared_task(base=FleetTask, bind=True, name="fleettune.distill", **RETRY)
def distill(self: FleetTask, fed: str, version: int, tier: str) -> str:
    """A published version distilled onto a smaller tier's base (shared/pipeline/distill.py)."""
    runtime, deployment = self.runtime, Deployment(self.runtime.redis)
    variant = deployment.distilled_tiers(fed).get(tier)
    if variant is None or runtime.state.federations.config(fed) is None:
        deployment.forget_due(fed, version, tier)  # the tier or federation went away meanwhile
        return "no such tier"
    manifest = distill_version(runtime.state, runtime.store, runtime.settings, fed, version, tier, variant.base_model,
                               variant.distillation)
    deployment.record_distilled(fed, tier, version)
    log.info("%s v%s distilled for tier %s onto %s: student loss %.3f -> %.3f", fed, version, tier,
             variant.base_model, manifest["student_loss_first"], manifest["student_loss_last"])
    return manifest["adapter_sha256"]


@shared_task(base=FleetTask, bind=True, name="fleettune.export", time_limit=_settings.export_time_limit_s,
             soft_time_limit=int(_settings.export_time_limit_s * 0.9), **RETRY)
def export(self: FleetTask, fed: str, version: int, fmt: str) -> str:
    """A published version exported to an on-device runtime's format (shared/export/exporter.py).

    A conversion that fails is retried with backoff, `export_attempts` times in all, and then stays
    failed with the converter's reason; an adapter no runtime takes fails at once. Neither touches
    the round pipeline: exports have their own queue and their own record."""
    runtime, exports = self.runtime, Exports(self.runtime.redis)
    config = runtime.state.federations.config(fed)
    if config is None or fmt not in FORMATS:
        exports.forget_due(fed, version, fmt)  # the federation went away meanwhile
        return "no such federation"
    revision = versions.manifest(runtime.store, fed, version).get("config_revision")
    config = runtime.state.federations.config(fed, revision) or config  # the adapter this version has
    attempt = self.request.retries + 1
    try:
        local = registered_base(runtime, exporter.base_source(config))
        record = exporter.export_version(runtime.store, runtime.settings, config, version, fmt, local_base=local)
    except exporter.ExportFailed as exc:
        final = isinstance(exc, exporter.Unsupported) or attempt >= runtime.settings.export_attempts
        exports.failed(fed, version, fmt, exc.reason, attempt, final)
        runtime.metrics.observe_export(fmt, "failed" if final else "retried")
        log.warning("%s v%s export to %s failed (attempt %d%s): %s", fed, version, fmt, attempt,
                    ", final" if final else "", exc.reason)
        if final:
            return "failed"
        raise self.retry(countdown=min(300, 5 * 2 ** (attempt - 1)), max_retries=runtime.settings.export_attempts)
    exports.ready(fed, version, fmt, record, attempt)
    runtime.metrics.observe_export(fmt, "ready")
    log.info("%s v%s exported to %s: max |logit diff| %s, base %d bytes, adapter %d bytes", fed, version, fmt,
             record["parity"]["max_abs_logit_diff"], record["base"]["size"], record["adapter"]["size"])
    return "ready"


def registered_base(runtime: Runtime, source: str) -> str | None:
    """A registered base (id@version) as a local directory, fetched from the store once per sha256."""
    if "@" not in source:
        return None
    import tempfile
    from pathlib import Path

    from fleettune.shared.device import models

    model_id, _, version = source.partition("@")
    try:
        record = ModelRegistry(runtime.redis, runtime.store, None, runtime.settings).version(model_id, version)
        download = {k: record[k] for k in ("sha256", "size", "filename")}
        cache = Path(tempfile.gettempdir()) / "fleettune-bases"
        return str(models.fetch_registered(download, cache, lambda _, limit: runtime.store.get(record["key"], limit)))
    except TRANSIENT:
        raise
    except Exception as exc:  # gone from the registry, bytes that do not match: the export cannot run
        raise exporter.ExportFailed(f"the registered base {source}: {type(exc).__name__}: {exc}") from exc


@shared_task(base=FleetTask, bind=True, name="fleettune.sweep", **RETRY)
def sweep(self: FleetTask) -> int:
    """Beat's repair pass: starts no worker did, rounds past their deadline, closes whose lease
    expired, ended rounds with no next round, evaluations and distillations due long ago but never
    recorded, canary steps whose time passed, and received messages that were lost (re-driven from
    the ledger)."""
    state, now = self.runtime.state, time.time()
    state.federations.heartbeat("beat", now)
    starts = state.federations.starts_due(before=now - START_GRACE_S)  # recorded by the API; the task was lost
    for fed in starts:
        start.delay(fed)
    due = state.rounds.rounds_needing_a_close(now)
    for fed, round_no in due:
        close_round.delay(fed, round_no)
    lost = state.evaluations.evaluations_due(before=now - 2 * self.runtime.settings.task_time_limit_s)
    for fed, version in lost:
        evaluate.delay(fed, version)
    distills = Deployment(self.runtime.redis).due(before=now - 2 * self.runtime.settings.task_time_limit_s)
    for fed, version, tier in distills:
        distill.delay(fed, version, tier)
    # an export runs for minutes: re-sent only once one would have timed out (the API's asks are due at 0)
    exports = Exports(self.runtime.redis).due(before=now - self.runtime.settings.export_time_limit_s)
    for fed, version, fmt in exports:
        export.delay(fed, version, fmt)
    for fed in state.federations.names():  # canary gates whose step time passed with no report to look
        Rollouts(state).tick(fed)
    redriven = _redrive(self.runtime, enqueuer(self.app), now)
    if redriven:
        log.warning("re-drove %d received messages that had no outcome", redriven)
    pruned, deleted = retention.prune(state, self.runtime.store, now, history=self.runtime.settings.history_rounds)
    if pruned:
        log.info("retention: %d rounds pruned, %d update objects deleted", pruned, deleted)
    return len(starts) + len(due) + len(lost) + len(distills) + len(exports) + redriven


def _redrive(runtime: Runtime, enqueue, now: float) -> int:
    """Re-drive lost messages only (neither waiting in the ingest queue nor held by a live worker),
    one sweep at a time: two overlapping sweeps would each re-drive the same entries."""
    lock = Lease(runtime.redis, keys.REDRIVE_LOCK, uuid.uuid4().hex, REDRIVE_LOCK_S)
    if not lock.hold():
        return 0
    try:
        return runtime.ledger.redrive(now, enqueue, held=broker.held_digests(runtime.redis),
                                      queued_since=broker.oldest_sent_at(runtime.redis, INGEST_QUEUE))[0]
    finally:
        lock.release()
