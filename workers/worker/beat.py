"""Beat with a leader lease: run as many `fleettune beat` processes as you like, exactly one sends.

Celery's in-memory scheduler (its default persists with shelve, that is pickle), sending only
while it holds the `ft:beat:leader` lease; a standby takes over within one TTL of the leader dying.

Beat must outlive Redis outages: Celery's beat loop ends on any exception from `tick()`, and a
beat embedded in a worker (`--beat`) is a child process nobody restarts. So `tick` treats an
unreachable Redis as "not leading, look again shortly", and `BeatKeeper` (a worker bootstep)
starts a new embedded beat when the old one died.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid

import redis
from celery import bootsteps
from celery.beat import EmbeddedService, Scheduler
from celery.worker import state as worker_state
from kombu.exceptions import OperationalError

from fleettune.shared import keys
from fleettune.shared.state.lease import Lease

log = logging.getLogger(__name__)
# any Redis error: connection loss, a restart still loading, a demoted primary (ReadOnlyError)
UNREACHABLE = (redis.RedisError, OperationalError, OSError)
MAX_HOLD_OFF_S = 5.0


class LeaderScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from fleettune.workers.worker.app import runtime_of

        settings = self.app.fleettune_settings
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease = Lease(runtime_of(self.app).redis, keys.BEAT_LEADER, owner, max(3 * settings.sweep_interval_s, 5))
        self.leading = False
        self.failures = 0  # consecutive ticks that could not reach Redis

    def tick(self, *args, **kwargs) -> float:
        try:
            leading = self.lease.hold()
            if leading:
                interval = super().tick(*args, **kwargs)
        except UNREACHABLE as exc:
            # we cannot know whether the lease is still ours: send nothing until Redis answers; a
            # standby may take over meanwhile, which the lease allows (one sender at a time)
            self.failures += 1
            if self.failures == 1 or self.failures % 30 == 0:
                log.warning("beat cannot reach Redis (%s: %s): holding off", type(exc).__name__, exc)
            self._lead(False)
            return min(0.5 * 2 ** min(self.failures, 4), MAX_HOLD_OFF_S, self.max_interval)
        if self.failures:
            log.warning("beat reaches Redis again after %d failed ticks", self.failures)
            self.failures = 0
        self._lead(leading)
        return interval if leading else min(self.lease.ttl_ms / 3000, self.max_interval)

    def _lead(self, leading: bool) -> None:
        if leading != self.leading:
            log.warning("beat %s %s the leader lease", self.lease.owner.decode(), "holds" if leading else "lost")
            self.leading = leading

    def close(self) -> None:
        if self.leading:
            try:
                self.lease.release()  # hand over at once instead of after the TTL
            except UNREACHABLE:
                pass  # the lease lapses by itself within its TTL
        super().close()


class BeatKeeper(bootsteps.StartStopStep):
    """Starts a new embedded beat when the worker's (`--beat`) died: killed, or out of memory.

    Checked on the worker's timer, in its main thread (forking from another thread could copy a held
    lock into the child). A dead beat is replaced while the worker runs; at shutdown, the live one
    is stopped (Celery's Beat step stops only the first).
    """

    requires = ("celery.worker.components:Beat", "celery.worker.components:Timer")
    CHECK_S = 2.0

    def __init__(self, w, **kwargs) -> None:
        super().__init__(w, **kwargs)
        self.tref = None
        self.first = None

    def start(self, w) -> None:
        if getattr(w, "beat", None) is not None:
            self.first = w.beat
            self.tref = w.timer.call_repeatedly(self.CHECK_S, self.check, (w,), priority=10)

    def check(self, w) -> None:
        beat = w.beat
        if beat is None or beat.is_alive() or worker_state.should_stop is not None \
                or worker_state.should_terminate is not None:
            return
        log.error("the embedded beat (pid %s) died with exit code %s: starting another", beat.pid, beat.exitcode)
        w.beat = EmbeddedService(w.app, schedule_filename=w.schedule_filename, scheduler_cls=w.scheduler)
        w.beat.start()

    def stop(self, w) -> None:
        if self.tref is not None:
            self.tref.cancel()
        if self.first is not None and w.beat is not self.first and w.beat.is_alive():
            w.beat.stop()
