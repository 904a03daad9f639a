"""Celery tasks: decode, call shared/, schedule follow-ups. No domain logic lives here."""

from __future__ import annotations

import logging
import time

from celery import Task, shared_task

from shared.ingest import TRANSIENT
from shared.runtime import Runtime
from workers.app import runtime_of

log = logging.getLogger(__name__)
RETRY = dict(autoretry_for=TRANSIENT, retry_backoff=True, retry_backoff_max=60, retry_jitter=True, max_retries=10)


class FleetTask(Task):
    """Gives each task the process's Runtime, built on first use (after the prefork fork)."""

    @property
    def runtime(self) -> Runtime:
        return runtime_of(self.app)


@shared_task(base=FleetTask, bind=True, name="fleettune.ingest", **RETRY)
def ingest(self: FleetTask, raw: bytes) -> str:
    result = self.runtime.ingestor.ingest(raw)
    if result.outcome == "rejected":
        log.info("rejected %s/%s/%s: %s %s", result.federation, result.round, result.device,
                 result.reason.value, result.detail)
    if result.round_ready:
        close_round.delay(result.federation, result.round)
    return result.outcome


@shared_task(base=FleetTask, bind=True, name="fleettune.close_round", **RETRY)
def close_round(self: FleetTask, fed: str, round_no: int) -> str:
    result = self.runtime.coordinator.close(fed, round_no)
    if result.decision in ("closing", "failed"):
        log.info("%s round %s %s -> version %s", fed, round_no, result.decision, result.version)
    return result.decision


@shared_task(base=FleetTask, bind=True, name="fleettune.sweep", **RETRY)
def sweep(self: FleetTask) -> int:
    """Close every open round whose deadline has passed (run by beat every sweep interval)."""
    due = self.runtime.state.due_rounds(time.time())
    for fed, round_no in due:
        close_round.delay(fed, round_no)
    return len(due)
