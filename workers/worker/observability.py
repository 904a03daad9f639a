"""The worker's /metrics endpoint: served by the main process, summing every pool process."""

from __future__ import annotations

import logging
import os

from celery.signals import worker_init, worker_process_shutdown
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client import multiprocess as prom_multiprocess

from fleettune.shared import redis_connect
from fleettune.shared.metrics import QueueCollector, multiprocess

log = logging.getLogger(__name__)


@worker_init.connect
def serve_metrics(sender=None, **_) -> None:
    """Start /metrics in the main process, before the pool forks (so no child inherits the socket)."""
    from fleettune.workers.worker.app import QUEUES

    app = sender.app
    settings = app.fleettune_settings
    if not settings.metrics_port:
        return
    if multiprocess():
        registry = CollectorRegistry()
        prom_multiprocess.MultiProcessCollector(registry)
    else:
        log.warning("PROMETHEUS_MULTIPROC_DIR is not set: /metrics shows this process only, "
                    "not the pool's (use `fleettune worker`, which sets it)")
        registry = REGISTRY
    registry.register(QueueCollector(redis_connect.connect(settings), QUEUES))
    start_http_server(settings.metrics_port, addr=settings.metrics_addr, registry=registry)
    log.info("metrics on http://%s:%s/metrics", settings.metrics_addr, settings.metrics_port)


@worker_process_shutdown.connect
def forget_dead_process(pid=None, **_) -> None:
    if multiprocess():
        prom_multiprocess.mark_process_dead(pid or os.getpid())
