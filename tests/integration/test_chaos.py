"""Chaos: a steady stream of submissions through the gateway while workers are SIGKILLed at random.

Pool children and whole worker process groups (main process, pool and beat) are killed every
0.2-0.6 s and restarted by the test, as a supervisor would. Then the accounting check:
  - every message the gateway received has exactly one outcome, and each update counted once;
  - every published version equals the float64 reference over its manifest's contributors;
  - no version number has two contents (each manifest names the bytes stored);
  - every round closed within a bound of its last submission.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
import redis
from safetensors.numpy import load

from fleettune import DeviceClient, Federation
from fleettune.shared.protocol import versions
from fleettune.shared.control.auth import Tokens
from fleettune.shared.federation import FederationConfig
from fleettune.shared.runtime import Runtime
from fleettune.shared.settings import Settings
from fleettune.shared.protocol.updates import encode_update
from fleettune.workers.local import services
from tests.reference import median_claim, next_global, random_deltas

pytestmark = pytest.mark.services
DEVICES = [f"c{i}" for i in range(8)]
# rounds go on until at least MIN_KILLS kills happened; a loaded machine restarts workers slowly
# (18 kills in 24 rounds beside a soak and the rest of the suite), so the cap is generous
MIN_ROUNDS, MAX_ROUNDS, MIN_KILLS = 4, 60, 20
# a liveness bound, not a speed goal: on 2 cores saturated by a soak and two benchmarks beside the
# suite, one killed worker's message took over 90 s to be re-driven and settled
CLOSE_BOUND_S = 180


class Supervisor:
    """Kills workers at random and restarts whatever died."""

    def __init__(self, env: dict[str, str], workdir, count: int, seed: int) -> None:
        self.env, self.workdir, self.rng = env, workdir, random.Random(seed)
        self.workers = [self._start(i) for i in range(count)]
        self.kills = {"child": 0, "main": 0}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _start(self, i: int) -> services.Worker:
        return services.Worker(f"chaos{i}-{time.monotonic_ns()}", self.env, self.workdir, beat=i == 0, via_cli=True)

    @property
    def total(self) -> int:
        return self.kills["child"] + self.kills["main"]

    def _run(self) -> None:
        while not self.stop.wait(self.rng.uniform(0.2, 0.6)):
            i = self.rng.randrange(len(self.workers))
            worker = self.workers[i]
            children = subprocess.run(["pgrep", "-P", str(worker.proc.pid)], capture_output=True, text=True).stdout.split()
            if children and self.total % 2 == 0:  # alternate: a pool child, then a whole process group
                os.kill(int(self.rng.choice(children)), signal.SIGKILL)  # a pool child: the pool replaces it
                self.kills["child"] += 1
            else:
                worker.kill()  # the main process with its pool and any beat
                self.kills["main"] += 1
            self.restart_dead()

    def restart_dead(self) -> None:
        for i, worker in enumerate(self.workers):
            if not worker.alive():
                self.workers[i] = self._start(i)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self.restart_dead()


def test_a_steady_stream_under_random_worker_kills_keeps_every_account(redis_url, s3_endpoint, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("chaos")
    env = services.service_env(redis_url.rsplit("/", 1)[0] + "/12", s3_endpoint, bucket="fleettune-chaos",
                               FLEETTUNE_REDRIVE_AFTER="3")
    client = redis.Redis.from_url(env["FLEETTUNE_REDIS_URL"])
    api = services.Api(env, workdir)
    supervisor = Supervisor(env, workdir, count=3, seed=7)
    store = Runtime.from_settings(Settings.from_env(env)).store
    try:
        federation = Federation(Tokens(client).create_api_key("admin", "chaos")[1], "chaos", api.url)
        federation.create(model="tiny-llama", strategy={"algorithm": "fedavg", "round_config": {
            "max_update_norm": 0.5, "server_lr": 0.9, "max_num_samples": 300, "timeout_seconds": 600}})
        devices = {d: DeviceClient(federation.register_device(d), "chaos", api.url) for d in DEVICES}
        session = federation.train(model="tiny-llama", rounds=MAX_ROUNDS, min_updates=len(DEVICES))
        spec = FederationConfig.from_json(client.get("ft:fed:chaos:config")).spec.tensors
        sent: dict[int, dict[str, tuple[dict, int]]] = {}
        supervisor.thread.start()
        round_no = 0
        while round_no < MIN_ROUNDS or (supervisor.total < MIN_KILLS and round_no < MAX_ROUNDS):
            round_no += 1
            sent[round_no] = {}
            for i, (device, device_client) in enumerate(devices.items()):
                plan = device_client.check_in()
                assert plan["round"] == round_no
                delta = random_deltas(spec, np.random.default_rng([round_no, i]), 0.003 * (i + 1))
                samples = 20 + 37 * i
                device_client.send(plan, encode_update(delta), num_samples=samples)
                sent[round_no][device] = (delta, samples)
                time.sleep(0.25)  # a steady stream, not one burst
            submitted = time.monotonic()
            while federation.round(round_no)["status"] != "closed":
                assert time.monotonic() - submitted < CLOSE_BOUND_S, f"round {round_no}: {federation.round(round_no)}"
                time.sleep(0.2)
        supervisor.finish()
        rounds = round_no
        if rounds < MAX_ROUNDS:
            session.stop()  # enough: the federation's remaining rounds are not needed
        print(f"kills: {supervisor.kills} over {rounds} rounds")
        assert supervisor.total >= MIN_KILLS and supervisor.kills["main"] >= MIN_KILLS // 2 - 1, supervisor.kills

        # every received message has exactly one outcome; each update was counted once
        received = [k.decode().rsplit(":", 1)[1] for k in client.scan_iter("ft:rcv:*")]
        assert len(received) == rounds * len(DEVICES)
        assert all(client.exists(f"ft:msg:{digest}") for digest in received)
        stats = {k.decode(): int(v) for k, v in client.hgetall("ft:fed:chaos:stats").items()}
        assert stats == {"received": rounds * len(DEVICES), "accepted": rounds * len(DEVICES)}

        # every version equals the reference over its contributors, and names the bytes stored
        prev = load(store.get("federations/chaos/versions/000000/adapter_model.safetensors"))
        for version in range(1, rounds + 1):
            manifest = federation.client.get(f"/api/v1/federations/chaos/versions/{version}")
            contributors = manifest["contributors"]
            assert contributors == sorted(DEVICES)
            blob = store.get(f"federations/chaos/versions/{version:06d}/adapter_model.safetensors")
            assert hashlib.sha256(blob).hexdigest() == manifest["adapter_sha256"]
            previous = median_claim([n for _, n in sent[version - 1].values()], 300) if version > 1 else None
            reference = next_global(prev, [sent[version][d][0] for d in contributors],
                                    [sent[version][d][1] for d in contributors], 0.5, 300, 0.9,
                                    reference_claim=previous)
            published = load(blob)
            assert max(float(np.abs(published[k] - reference[k]).max()) for k in reference) <= 1e-6
            prev = published
    finally:
        supervisor.stop.set()
        for worker in supervisor.workers:
            worker.stop()
        api.stop()


def test_a_flood_of_5000_messages_with_4000_duplicates_counts_each_update_once(pipeline):
    devices = [f"flood-{i:04d}" for i in range(1000)]
    config = pipeline.create(devices=devices, max_rounds=1, min_updates=1000, max_update_norm=1.0,
                             max_num_samples=500, timeout_seconds=300)
    rng = np.random.default_rng(3)
    deltas = [random_deltas(config.spec.tensors, rng, 0.002) for _ in devices]
    samples = [int(n) for n in rng.integers(5, 400, len(devices))]
    before = pipeline.runtime.state.federations.stats(None).get("redelivered", 0)
    started = time.monotonic()
    for device, delta, n in zip(devices, deltas, samples):
        pipeline.submit(config, 1, device, delta, num_samples=n, times=5)  # each envelope five times
    info = pipeline.wait_round(config, 1, timeout=240)
    seconds = time.monotonic() - started
    assert info.status == "closed" and info.version == 1
    stats = pipeline.runtime.state.federations.stats(config.name)
    assert stats == {"received": 1000, "accepted": 1000}
    # every duplicate was answered from the outcome recorded under its digest, none counted again
    assert pipeline.runtime.state.federations.stats(None).get("redelivered", 0) - before >= 4000
    # the weight cap of a first round this large is fixed by the median of its first 32 accepted
    # claims, whichever arrived first: take the one recorded, check it is such a median, and the sum
    reference_claim = versions.manifest(pipeline.runtime.store, config.name, 1)["weight_cap"] / 2
    assert sum(n < reference_claim for n in samples) >= 15 and sum(n > reference_claim for n in samples) >= 15
    reference = next_global(pipeline.version_arrays(config, 0), deltas, samples, 1.0, 500, 1.0,
                            reference_claim=reference_claim)
    published = pipeline.version_arrays(config, 1)
    assert max(float(np.abs(published[k] - reference[k]).max()) for k in reference) <= 1e-6
    print(f"5,000 messages (1,000 updates x 5) through the queue and closed in {seconds:.1f}s")
