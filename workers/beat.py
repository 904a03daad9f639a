"""Beat with a leader lease: run as many `fleettune beat` processes as you like, exactly one sends.

Celery's in-memory scheduler (its default persists with shelve, that is pickle), sending only
while it holds the `ft:beat:leader` lease; a standby takes over within one TTL of the leader dying.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid

from celery.beat import Scheduler

from fleettune.shared import keys
from fleettune.shared.lease import Lease

log = logging.getLogger(__name__)


class LeaderScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from fleettune.workers.app import runtime_of

        settings = self.app.fleettune_settings
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease = Lease(runtime_of(self.app).redis, keys.BEAT_LEADER, owner, max(3 * settings.sweep_interval_s, 5))
        self.leading = False

    def tick(self, *args, **kwargs) -> float:
        leading = self.lease.hold()
        if leading != self.leading:
            log.warning("beat %s %s the leader lease", self.lease.owner.decode(), "holds" if leading else "lost")
            self.leading = leading
        if not leading:
            return min(self.lease.ttl_ms / 3000, self.max_interval)
        return super().tick(*args, **kwargs)

    def close(self) -> None:
        if self.leading:
            self.lease.release()  # hand over at once instead of after the TTL
        super().close()
