"""Rounds on a simulated clock: devices whose speeds differ, synchronous or async (FedBuff).

The devices really train and everything goes through the gateway and the production tasks; only
time is simulated. Each device takes `seconds[i]` (times a little jitter) per update, so a
synchronous round lasts as long as its slowest device, while an async device checks in again as
soon as it has sent. Events run one at a time in simulated-time order, so a run is reproducible.
Used by `bench/async.py` and `fleettune demo --async`.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import time
from collections.abc import Iterator
from statistics import NormalDist

import numpy as np

from fleettune import DeviceClient, FleettuneAPIError
from fleettune.shared import keys
from fleettune.shared.device.client import Device, Fetched
from fleettune.shared.federation import FederationConfig
from fleettune.shared.runtime import Runtime
from fleettune.workers.local.harness import wait_evaluation, wait_round

@dataclasses.dataclass(frozen=True)
class Point:
    """The global model after a publish, on the simulated clock."""

    clock: float  # simulated seconds since the start
    version: int
    heldout_ppl: float
    updates: int  # device updates sent so far: the compute spent
    contributors: int = 0  # updates in this version
    stale: float = 0.0  # mean staleness of this version's updates (async)
    staleness: tuple[int, ...] = ()  # each of its updates' staleness (async)


def device_seconds(n: int, spread: float = 10.0, median: float = 60.0, seed: int = 0) -> np.ndarray:
    """Seconds per update for `n` devices: a lognormal's n quantiles ((i + 0.5) / n), its sigma set
    so the slowest device takes `spread` times the fastest's time, in an order shuffled by `seed`.
    Quantiles rather than draws: a fleet of 8 gets the whole heavy tail, not a lucky sample of it."""
    z = NormalDist().inv_cdf
    quantiles = np.array([z((i + 0.5) / n) for i in range(n)])
    sigma = math.log(spread) / (2 * quantiles[-1]) if n > 1 else 0.0
    return median * np.exp(sigma * np.random.default_rng(seed).permutation(quantiles))


def _jitter(rng: np.random.Generator) -> float:
    return float(np.exp(rng.normal(0.0, 0.1)))  # the same device is not equally fast every time


def run_sync(app, runtime: Runtime, config: FederationConfig, devices: list[Device], clients: dict[str, DeviceClient],
             seconds: np.ndarray, budget: int, seed: int = 0, timeout: float = 600,
             quorum: int | None = None) -> Iterator[Point]:
    """Synchronous rounds until `budget` updates are spent. With every device (`quorum` None) a
    round lasts as long as its slowest device; with a quorum, the round's deadline falls when its
    `quorum` fastest devices have sent (over-selection, as production systems run) and the rest
    are dropped: they are not trained here, and not counted as compute."""
    rng, clock, sent, fed = np.random.default_rng(seed), 0.0, 0, config.name
    quorum = quorum or len(devices)
    for round_no in range(1, budget // quorum + 1):
        took = seconds * np.array([_jitter(rng) for _ in devices])
        fastest = sorted(range(len(devices)), key=lambda i: took[i])[:quorum]
        for i in sorted(fastest):
            devices[i].run_round(clients[devices[i].device_id], seed=round_no)
        sent += quorum
        clock += float(max(took[i] for i in fastest))
        if quorum < len(devices):  # simulated time has reached the deadline: let the sweep see it
            runtime.redis.hset(keys.round_info(fed, round_no), "deadline", repr(time.time()))
        done = wait_round(app, runtime, fed, round_no, timeout)
        if done.status != "closed":
            raise RuntimeError(f"round {round_no} {done.status}: {done.reason}")
        ppl = wait_evaluation(runtime, fed, done.version, timeout)["heldout_mean"]
        yield Point(clock, done.version, ppl, sent, quorum)


def run_async(app, runtime: Runtime, config: FederationConfig, devices: list[Device], clients: dict[str, DeviceClient],
              seconds: np.ndarray, budget: int, seed: int = 0, timeout: float = 600) -> Iterator[Point]:
    """Each device checks in, trains for its time, sends and checks in again, until `budget` updates
    are spent. A device that has sent from the newest version waits for the next (one update per
    device per base version); the buffer publishes every `buffer_size` accepted updates."""
    rng, fed = np.random.default_rng(seed), config.name
    state = runtime.state
    queue: list[tuple[float, int, Fetched]] = []  # (when it finishes training, device index, what it fetched)
    waiting: list[int] = []  # up to date: they check in after the next publish
    sent, version = 0, 0

    def check_in(i: int, now: float) -> None:
        try:
            fetched = devices[i].fetch(clients[devices[i].device_id])
        except FleettuneAPIError as refused:
            if refused.code != "up_to_date":
                raise
            waiting.append(i)
            return
        heapq.heappush(queue, (now + seconds[i] * _jitter(rng), i, fetched))

    for i in range(len(devices)):
        check_in(i, 0.0)
    while queue and sent < budget:
        clock, i, fetched = heapq.heappop(queue)
        buffer = state.federations.current_round(fed)  # nothing else is sending: its update joins this one
        report = devices[i].train_and_send(clients[devices[i].device_id], fetched, seed=sent)
        sent += 1
        outcome = clients[devices[i].device_id].wait_outcome(report.receipt, timeout=timeout)
        if outcome["status"] == "accepted" and state.rounds.update_count(fed, buffer) >= config.policy.buffer_size:
            done = wait_round(app, runtime, fed, buffer, timeout)
            if done.status != "closed":
                raise RuntimeError(f"buffer {buffer} {done.status}: {done.reason}")
            version = done.version
            updates = state.rounds.updates(fed, buffer)
            ppl = wait_evaluation(runtime, fed, version, timeout)["heldout_mean"]
            taus = tuple(sorted(u.staleness for u in updates.values()))
            yield Point(clock, version, ppl, sent, len(updates), sum(taus) / max(len(taus), 1), taus)
            ready, waiting[:] = list(waiting), []
            for j in ready:
                check_in(j, clock)
        check_in(i, clock)


def time_to(points: list[Point], target: float) -> float | None:
    """The simulated time at which the global model first reached `target` perplexity (or None)."""
    return next((p.clock for p in points if p.heldout_ppl <= target), None)
