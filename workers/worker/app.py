"""The Celery app: a Redis broker, at-least-once delivery, and no pickle.

`celery -A fleettune.workers.worker.app worker` and `fleettune worker` both start workers from this module.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from celery import Celery

from fleettune.shared import redis_connect
from fleettune.shared.runtime import Runtime
from fleettune.shared.settings import Settings
from fleettune.workers.worker.beat import BeatKeeper

INGEST_QUEUE = "fleettune.ingest"
ROUNDS_QUEUE = "fleettune.rounds"  # its own queue, so a backlog of updates never delays a close
EVAL_QUEUE = "fleettune.eval"  # evaluation is slow (a forward pass over held-out text): kept apart
QUEUES = (INGEST_QUEUE, ROUNDS_QUEUE, EVAL_QUEUE)


def make_app(settings: Settings | None = None, broker_url: str | None = None, runtime: Runtime | None = None) -> Celery:
    settings = settings or Settings.from_env()
    app = Celery("fleettune", broker=broker_url or redis_connect.broker_url(settings), include=["fleettune.workers.worker.tasks", "fleettune.workers.worker.observability"])
    app.conf.update(
        # msgpack only: no pickle can reach a worker, and envelopes arrive as raw bytes
        task_serializer="msgpack",
        accept_content=["msgpack"],
        result_serializer="msgpack",
        result_accept_content=["msgpack"],
        task_ignore_result=True,
        # at-least-once: a task is acked after it ran, and requeued if its worker dies;
        # the tasks are idempotent, so a second delivery changes nothing
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=max(1, int(settings.task_time_limit_s * 0.9)),
        # must exceed every time limit (Settings checks it), or a running task is delivered twice;
        # messages held by a worker that died come back after it, found by a sweep every interval
        broker_transport_options={
            **redis_connect.broker_transport_options(settings),  # Sentinel: the primary's name
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": settings.restore_interval_s,
            "unacked_restore_throttle": 1,
        },
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_default_queue=INGEST_QUEUE,
        task_routes={
            "fleettune.close_round": {"queue": ROUNDS_QUEUE},
            "fleettune.start": {"queue": ROUNDS_QUEUE},
            "fleettune.sweep": {"queue": ROUNDS_QUEUE},
            "fleettune.evaluate": {"queue": EVAL_QUEUE},
            "fleettune.export": {"queue": EVAL_QUEUE},  # minutes of conversion: never in a close's way
        },
        # Round deadlines are found by a periodic sweep, not by countdown tasks: with a Redis broker
        # an ETA past the visibility timeout is redelivered again and again while it waits.
        beat_schedule={"fleettune-sweep": {"task": "fleettune.sweep", "schedule": settings.sweep_interval_s}},
        # in memory (the default persists with shelve, that is pickle), sending only while it holds
        # the leader lease: any number of beats, exactly one sends
        beat_scheduler="fleettune.workers.worker.beat:LeaderScheduler",
    )
    app.steps["worker"].add(BeatKeeper)  # a `--beat` worker's beat is restarted if it dies
    app.fleettune_settings = settings
    app.fleettune_runtime = runtime  # built lazily in each worker process when None
    return app


def runtime_of(app: Celery) -> Runtime:
    """The app's Runtime, built on first use: in a prefork worker that is after the fork."""
    if app.fleettune_runtime is None:
        app.fleettune_runtime = Runtime.from_settings(app.fleettune_settings)
    return app.fleettune_runtime


app = make_app()


def enqueuer(app: Celery) -> Callable[..., None]:
    """Put one msgpack envelope on the ingest queue, as the only argument of the ingest task.

    The receive time rides in a header, so /metrics can tell the age of the oldest waiting message.
    """
    def enqueue(raw: bytes, received_at: float | None = None) -> None:
        app.send_task("fleettune.ingest", args=[raw], queue=INGEST_QUEUE,
                      headers={"fleettune_sent_at": received_at if received_at is not None else time.time()})

    return enqueue


def starter(app: Celery) -> Callable[[str], None]:
    """Have a worker do the start the API recorded for a federation (task fleettune.start)."""
    def begin(fed: str) -> None:
        app.send_task("fleettune.start", args=[fed])

    return begin
