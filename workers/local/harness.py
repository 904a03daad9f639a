"""Run a federation of real training devices through the real tasks, on embedded or real services.

Used by `fleettune demo` and by the quality benchmarks: the devices train in this process (taking
turns on one model), while a Celery worker thread ingests, aggregates and evaluates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import fakeredis
import numpy as np
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from tqdm import tqdm

from fleettune.shared.protocol import versions
from fleettune.shared.device.client import Device
from fleettune.shared.federation import FederationConfig
from fleettune.shared.runtime import Runtime
from fleettune.shared.settings import Settings
from fleettune.shared.state import FederationState, RoundInfo
from fleettune import DeviceClient, Federation
from fleettune.shared.storage import LocalObjectStore, open_store
from fleettune.shared.protocol.updates import encode_update
from fleettune.workers.worker.app import QUEUES, enqueuer, make_app


@dataclasses.dataclass(frozen=True)
class RoundRow:
    round: int
    status: str
    updates: int
    rejected: int
    heldout_ppl: float
    general_ppl: float
    adapter_norm: float
    seconds: float
    train_seconds: float  # mean per device
    send_seconds: float  # mean per device: delta, encode, upload, enqueue
    guard: str = ""
    device_steps: int = 0  # optimizer steps all devices took this round


@contextlib.contextmanager
def embedded(settings: Settings, out_dir: Path) -> Iterator[tuple[Celery, Runtime, str]]:
    """Real services where the settings name them, embedded stand-ins where they do not.

    Without FLEETTUNE_REDIS_URL: kombu's in-memory broker and fakeredis, inside this process.
    Without FLEETTUNE_S3_ENDPOINT: a local directory. Either way a real Celery worker (solo pool,
    in a thread) consumes the production tasks.
    """
    if settings.redis_url:
        client, broker = redis.Redis.from_url(settings.redis_url), settings.redis_url
    else:
        client, broker = fakeredis.FakeRedis(), "memory://"
    store = open_store(settings) if settings.s3_endpoint else LocalObjectStore(out_dir / "objects")
    runtime = Runtime(settings, client, store)
    app = make_app(settings, broker_url=broker, runtime=runtime)
    if broker == "memory://":
        app.conf.broker_transport_options = {"polling_interval": 0.05}  # its default idles 1 s per poll
    with start_worker(app, pool="solo", perform_ping_check=False, queues=list(QUEUES), shutdown_timeout=60):
        yield app, runtime, broker


def wait_settled(state: FederationState, fed: str, round_no: int, timeout: float, poll: float = 0.05) -> RoundInfo:
    """Block until the round is closed or failed (for local runs and tests, never for workers)."""
    end = time.monotonic() + timeout
    while True:
        info = state.rounds.round_info(fed, round_no)
        if info is not None and info.status in ("closed", "failed"):
            return info
        if time.monotonic() > end:
            raise TimeoutError(f"{fed} round {round_no} still {info.status if info else 'unopened'} after {timeout}s")
        time.sleep(poll)


def wait_round(app: Celery, runtime: Runtime, fed: str, round_no: int, timeout: float):
    """Wait for the round to settle, sending the deadline sweep each second as beat would."""
    end = time.monotonic() + timeout
    while True:
        try:
            return wait_settled(runtime.state, fed, round_no, timeout=1.0)
        except TimeoutError:
            if time.monotonic() > end:
                raise
            app.send_task("fleettune.sweep")


def wait_evaluation(runtime: Runtime, fed: str, version: int, timeout: float) -> dict:
    end = time.monotonic() + timeout
    while (result := runtime.state.evaluations.evaluation(fed, version)) is None:
        if time.monotonic() > end:
            raise TimeoutError(f"{fed} v{version} not evaluated after {timeout}s")
        time.sleep(0.05)
    return result


@contextlib.contextmanager
def gateway(app: Celery, runtime: Runtime) -> Iterator[tuple[str, str]]:
    """The API (control plane and device gateway) in a thread of this process: (URL, an admin key)."""
    from fleettune.shared.control.auth import Tokens
    from fleettune.workers.api import create_app, serve_in_thread

    with serve_in_thread(create_app(runtime, enqueuer(app))) as url:
        yield url, Tokens(runtime.redis).create_api_key("admin", "experiment")[1]


def enroll(url: str, admin_key: str, fed: str, devices: list[Device]) -> dict[str, DeviceClient]:
    """Register each device through the API; returns its gateway client, holding only its token."""
    federation = Federation(admin_key, fed, url)
    return {d.device_id: DeviceClient(federation.register_device(d.device_id, d.ram_mb, d.storage_mb, d.tier), fed, url)
            for d in devices}


def send_hostile(client: DeviceClient, config: FederationConfig) -> dict:
    """A device sends an update holding NaN through the gateway; returns its (rejected) outcome."""
    arrays = {k: np.zeros(s, np.float32) for k, s in config.spec.tensors.items()}
    next(iter(arrays.values())).flat[0] = np.nan
    plan = client.check_in(ram_mb=1 << 20, storage_mb=1 << 20)  # it claims whatever passes the filter
    receipt = client.send(plan, encode_update(arrays), num_samples=10)
    return client.wait_outcome(receipt["receipt"], timeout=30)


def drive_secure(app: Celery, devices: list[Device], clients: dict[str, DeviceClient], timeout: float,
                 offline: set[str] = frozenset(), poll: float = 0.05) -> None:
    """Step every device through a secure round's stages, interleaved (they run in this one process);
    the devices in `offline` vanish after sending their shares, as a phone that loses its network."""
    end = swept = time.monotonic()
    end += timeout
    pending = {d.device_id: d for d in devices}
    while pending:
        for device_id, device in list(pending.items()):
            client = clients[device_id]
            if device_id in offline and device.secure.at_stage(client) == "masked":
                pending.pop(device_id)  # gone before its masked input: its neighbours' key shares unmask the rest
                continue
            if device.secure.step(client):
                pending.pop(device_id)
        if time.monotonic() > end:
            raise TimeoutError(f"secure aggregation: {sorted(pending)[:4]} still at it after {timeout}s")
        if time.monotonic() - swept > 0.5:  # as beat would: stage deadlines pass only when someone looks
            app.send_task("fleettune.sweep")
            swept = time.monotonic()
        time.sleep(poll)


def run_rounds(app: Celery, runtime: Runtime, config: FederationConfig, fleet: list[Device],
               clients: dict[str, DeviceClient], rounds: int, hostile: DeviceClient | None = None,
               progress: bool = True, timeout: float = 300, seed: int = 0,
               drop: Callable[[int], set[str]] | None = None) -> Iterator[RoundRow]:
    """Each round, every device trains and sends through the gateway (a hostile one first, if given).

    `seed` varies the devices' batch order between runs of the same rounds. In secure rounds
    `drop(round)` names devices that vanish mid-protocol (after sharing their keys)."""
    fed = config.name
    for round_no in range(1, rounds + 1):
        info = runtime.state.rounds.round_info(fed, round_no)
        if info is None or info.status != "open":
            return  # halted by the forgetting guard, or the federation completed
        started = time.monotonic()
        if hostile is not None:
            send_hostile(hostile, config)
        reports = []
        # under sampling only the round's picked devices train; the others would check in to the next round
        round_config = runtime.state.federations.config(fed, info.config_rev) or config
        sampled = round_config.policy.clients_per_round or round_config.aggregation.sampling_rate < 1
        cohort = runtime.state.rounds.cohort(fed, round_no) if sampled else None
        picked = [d for d in fleet if d.device_id in cohort] if sampled else fleet
        secure = round_config.aggregation.secure_aggregation is not None
        for device in tqdm(picked, desc=f"round {round_no}", unit="device", leave=False, disable=not progress):
            reports.append(device.run_round(clients[device.device_id], seed=seed * 100_003 + round_no,
                                            wait_secure=not secure))
        if secure:
            drive_secure(app, [d for d in picked if d.secure is not None], clients, timeout,
                         offline=drop(round_no) if drop else set())
        done = wait_round(app, runtime, fed, round_no, timeout)
        manifest = versions.manifest(runtime.store, fed, done.version) if done.status == "closed" else {}
        evaluation = (wait_evaluation(runtime, fed, done.version, timeout)
                      if done.status == "closed" and config.evaluation else {})
        yield RoundRow(
            round_no, done.status, len(manifest.get("contributors", [])), done.rejected,
            evaluation.get("heldout_mean", math.nan), evaluation.get("general", math.nan),
            manifest.get("global_norm", math.nan), time.monotonic() - started,
            sum(r.train_seconds for r in reports) / max(len(reports), 1),
            sum(r.send_seconds for r in reports) / max(len(reports), 1),
            evaluation.get("guard", ""), sum(r.steps for r in reports),
        )
