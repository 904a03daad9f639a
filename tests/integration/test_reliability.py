"""Faults that used to lose or stall work, on real Redis, S3, Celery workers and the API."""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis

from fleettune import DeviceClient, Federation
from fleettune.shared.control.auth import Tokens
from fleettune.shared.protocol.updates import encode_update
from fleettune.workers.local import services
from tests.reference import random_deltas

pytestmark = pytest.mark.services


def _eventually(predicate, timeout: float = 60, what: str = "condition"):
    end = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < end, f"{what} not met in {timeout}s"
        time.sleep(0.1)
    return value


def test_messages_the_broker_lost_are_redriven_from_the_ledger(redis_url, s3_endpoint, workdir):
    env = services.service_env(redis_url.rsplit("/", 1)[0] + "/8", s3_endpoint, bucket="fleettune-ledger",
                               FLEETTUNE_REDRIVE_AFTER="2", FLEETTUNE_RETENTION="2")
    client = redis.Redis.from_url(env["FLEETTUNE_REDIS_URL"])
    api = services.Api(env, workdir)
    worker = None
    try:
        federation, tokens, spec = _session(client, api.url, "ledger", ["a", "b", "c"], start_here=env)
        for i, token in enumerate(tokens.values()):
            device = DeviceClient(token, "ledger", api.url)
            plan = device.check_in()
            device.send(plan, encode_update(random_deltas(spec, np.random.default_rng(i), 0.01)), num_samples=5)
        assert client.llen("fleettune.ingest") == 3
        client.rpop("fleettune.ingest", 2)  # the broker loses two of them, as kombu can when a worker dies
        worker = services.Worker("ledger", env, workdir, beat=True, via_cli=True)
        done = _eventually(lambda: federation.round(1)["status"] == "closed" and federation.round(1), what="close")
        assert done["contributors"] == ["a", "b", "c"]
        assert int(client.hget("ft:stats", "redriven")) == 2
        assert int(client.hget("ft:fed:ledger:stats", "accepted")) == 3  # each counted once

        # retention: the round's update objects go from S3 after it; the published version stays
        from fleettune.shared.runtime import Runtime
        from fleettune.shared.settings import Settings

        store = Runtime.from_settings(Settings.from_env(env)).store
        # the prune deletes the objects, then the round's keys (a sweep finishes what one left)
        _eventually(lambda: not store.exists("updates/ledger/000001/a.safetensors")
                    and not client.exists("ft:fed:ledger:round:1:updates"), what="retention")
        assert store.exists("federations/ledger/versions/000001/adapter_model.safetensors")
    finally:
        if worker is not None:
            worker.stop()
        api.stop()


def _session(client: redis.Redis, api_url: str, fed: str, devices: list[str], model: str = "tiny-llama",
             start_here: dict[str, str] | None = None) -> tuple[Federation, dict, dict]:
    """A federation with these devices registered and a one-round session open: (federation, tokens, spec).

    With `start_here` (the services' env) and no worker running yet, the test does the start a
    worker would do (v0, round 1); the start task a worker takes later finds it done.
    """
    from fleettune.shared.federation import FederationConfig
    from fleettune.shared.runtime import Runtime
    from fleettune.shared.settings import Settings

    federation = Federation(Tokens(client).create_api_key("admin", fed)[1], fed, api_url)
    federation.create(model=model)
    tokens = {d: federation.register_device(d) for d in devices}
    federation.train(model=model, rounds=1, min_updates=len(devices), wait_started=None if start_here else 120)
    if start_here:
        Runtime.from_settings(Settings.from_env(start_here)).coordinator.start_requested(fed)
    return federation, tokens, FederationConfig.from_json(client.get(f"ft:fed:{fed}:config")).spec.tensors


def test_an_ingest_message_with_the_wrong_arguments_is_dead_lettered_not_dropped(pipeline):
    before = pipeline.runtime.state.federations.stats(None).get("rejected:malformed_envelope", 0)
    pipeline.app.send_task("fleettune.ingest", args=[b"one", b"two"], queue="fleettune.ingest")
    pipeline.app.send_task("fleettune.ingest", args=[], kwargs={"raw": b"x"}, queue="fleettune.ingest")
    _eventually(lambda: pipeline.runtime.state.federations.stats(None).get("rejected:malformed_envelope", 0) >= before + 2,
                what="two malformed dead letters")


def _beat(env: dict[str, str], workdir, name: str):
    import os
    import subprocess
    import sys
    from pathlib import Path

    log = workdir / f"beat-{name}.log"
    return subprocess.Popen([str(Path(sys.executable).parent / "fleettune"), "beat", f"--logfile={log}"],
                            env=dict(os.environ, **env), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)


def test_of_two_beats_one_leads_and_the_standby_takes_over_when_it_dies(redis_url, s3_endpoint, workdir):
    import os
    import signal

    env = services.service_env(redis_url.rsplit("/", 1)[0] + "/9", s3_endpoint, bucket="fleettune-beat")
    client = redis.Redis.from_url(env["FLEETTUNE_REDIS_URL"])
    worker = services.Worker("beatless", env, workdir)  # sweeps run here; the beats only send them
    beats = [_beat(env, workdir, "one"), _beat(env, workdir, "two")]
    try:
        leader = _eventually(lambda: client.get("ft:beat:leader"), what="a leader").decode()
        pids = {b.pid: b for b in beats}
        first = pids[int(leader.split(":")[1])]
        _eventually(lambda: client.hget("ft:heartbeats", "beat"), what="a sweep")
        time.sleep(3)
        assert client.get("ft:beat:leader").decode() == leader  # the standby never took it while it lived
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        killed_at = time.time()
        new = _eventually(lambda: (h := client.get("ft:beat:leader")) and h.decode() != leader and h.decode(),
                          timeout=30, what="a new leader")
        assert int(new.split(":")[1]) != first.pid
        _eventually(lambda: float(client.hget("ft:heartbeats", "beat")) > killed_at + 1, timeout=30,
                    what="sweeps after the takeover")
    finally:
        for b in beats:
            if b.poll() is None:
                os.killpg(b.pid, signal.SIGTERM)
                b.wait(20)
        worker.stop()


def test_an_embedded_beat_outlives_a_redis_restart_and_is_replaced_when_killed(s3_endpoint, tmp_path_factory):
    """The topology deploy/README.md prescribes: one `fleettune worker --beat`. Its beat used to exit
    when Redis went down (the lease's ConnectionError ended Celery's beat loop), and nothing started
    another when it was killed: no sweep ran again while the worker looked healthy."""
    import os
    import signal

    workdir = tmp_path_factory.mktemp("beat-keeper")
    port = services.free_port()
    redis_proc = _redis_server(port, workdir)
    env = services.service_env(f"redis://127.0.0.1:{port}/0", s3_endpoint, bucket="fleettune-keeper")
    client = redis.Redis(port=port)
    worker = services.Worker("keeper", env, workdir, beat=True, via_cli=True)
    swept_after = lambda t: (h := client.hget("ft:heartbeats", "beat")) and float(h) > t  # noqa: E731
    try:
        _eventually(lambda: swept_after(0), what="a first sweep")
        beat_pid = int(client.get("ft:beat:leader").decode().split(":")[1])

        os.killpg(redis_proc.pid, signal.SIGKILL)  # Redis down for a few of beat's ticks, then back empty
        redis_proc.wait()
        _eventually(lambda: not worker.alive() or _gone(beat_pid) or _beat_logged(workdir, "holding off"),
                    timeout=30, what="beat to notice the outage")
        redis_proc = _redis_server(port, workdir)
        back = time.time()
        _eventually(lambda: swept_after(back), timeout=60, what="sweeps after Redis came back")
        assert worker.alive() and not _gone(beat_pid), "the worker or its beat died with Redis"
        assert int(client.get("ft:beat:leader").decode().split(":")[1]) == beat_pid

        os.kill(beat_pid, signal.SIGKILL)  # the beat alone, as the OOM killer would
        killed = time.time()
        _eventually(lambda: swept_after(killed + 1), timeout=60, what="sweeps from a new beat")
        assert worker.alive() and int(client.get("ft:beat:leader").decode().split(":")[1]) != beat_pid
    finally:
        worker.stop()
        services._stop(redis_proc)


def test_a_backlog_older_than_the_redrive_delay_is_drained_not_multiplied(s3_endpoint, tmp_path_factory):
    """Submissions faster than the workers: the queue's backlog grows older than
    FLEETTUNE_REDRIVE_AFTER. The sweep used to re-drive by age alone, queued messages included
    (39,925 copies of 14,566 messages in one run); now only messages neither queued nor held by a
    worker are re-driven. The burst comes before the worker starts, so the backlog is there on any
    machine, however loaded; the worker's beat sweeps every second while it drains."""
    import hashlib

    from fleettune.shared.state import broker
    from fleettune.shared.protocol.adapter_spec import LAYOUTS, AdapterConfig
    from fleettune.shared.control.gateway import Gateway
    from fleettune.shared.control.presign import LocalPresigner
    from fleettune.shared.federation import FederationConfig, RoundPolicy
    from fleettune.shared.runtime import Runtime
    from fleettune.shared.settings import Settings
    from fleettune.workers.worker.app import make_app
    from fleettune.workers.worker.publish import RedisPublisher

    workdir = tmp_path_factory.mktemp("backlog")
    port = services.free_port()
    redis_proc = _redis_server(port, workdir)
    env = services.service_env(f"redis://127.0.0.1:{port}/0", s3_endpoint, bucket="fleettune-backlog",
                               FLEETTUNE_REDRIVE_AFTER="2", FLEETTUNE_DEVICE_RATE_LIMIT="100000")
    settings = Settings.from_env(env)
    runtime = Runtime.from_settings(settings)
    n = 800
    devices = [f"d{i:04d}" for i in range(n)]
    config = FederationConfig(name="backlog", model=LAYOUTS["tiny-llama"], adapter=AdapterConfig(rank=2, alpha=4),
                              base_model="tiny-llama",
                              policy=RoundPolicy(min_updates=n, timeout_seconds=900, max_rounds=1))
    runtime.coordinator.start(config, devices)
    spec = runtime.state.federations.config("backlog").spec.tensors
    gateway = Gateway(runtime.state, LocalPresigner(b"k" * 32), settings, lambda raw, at: None,
                      publisher=RedisPublisher(make_app(settings)))
    rng = np.random.default_rng(5)
    for device in devices:
        blob = encode_update(random_deltas(spec, rng, 0.001))
        runtime.store.put(f"updates/backlog/000001/{device}.safetensors", blob)
        gateway.submit("backlog", device, {"round": 1, "sha256": hashlib.sha256(blob).hexdigest(), "num_samples": 5,
                                           "base_version": 0, "train_seconds": 1.0, "metrics": {}})
    worker = services.Worker("backlog", env, workdir, concurrency=1, beat=True, via_cli=True)
    try:
        oldest_age = 0.0
        end = time.monotonic() + 600
        while (info := runtime.state.rounds.round_info("backlog", 1)).status not in ("closed", "failed"):  # the drain
            assert time.monotonic() < end, f"round 1 still {info.status}"
            if sent := broker.oldest_sent_at(runtime.redis, "fleettune.ingest"):
                oldest_age = max(oldest_age, time.time() - sent)
            time.sleep(0.2)
        stats = runtime.state.federations.stats("backlog")
        redriven = int(runtime.redis.hget("ft:stats", "redriven") or 0)
        print(f"backlog: {n} messages, the oldest waited {oldest_age:.1f}s (re-drive after 2 s); re-driven {redriven}")
        assert oldest_age > 2 * settings.redrive_after_s and runtime.redis.hget("ft:heartbeats", "beat")  # swept meanwhile
        assert info.status == "closed" and stats == {"received": n, "accepted": n}
        assert redriven <= n // 100
    finally:
        worker.stop()
        services._stop(redis_proc)


def _redis_server(port: int, workdir):
    import shutil
    import subprocess

    proc = subprocess.Popen([shutil.which("redis-server"), "--bind", "127.0.0.1", "--port", str(port),
                             "--dir", str(workdir), "--appendonly", "no", "--save", ""],
                            stdout=(workdir / "redis.log").open("a"), stderr=subprocess.STDOUT, start_new_session=True)
    _eventually(lambda: _pings(port), timeout=20, what="redis")
    return proc


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _beat_logged(workdir, text: str) -> bool:
    return any(text in log.read_text(errors="replace") for log in workdir.glob("worker-keeper*.log"))


@pytest.mark.parametrize("budget", ["within", "past"])
def test_updates_submitted_during_an_s3_outage_are_retried_or_redriven_and_counted_once(budget, redis_url, workdir):
    """Within the retry budget (8 s down; 10 retries backing off to 8 s, no re-drive) the retries
    carry the updates through; past it (2 retries, 1 s) they are dead-lettered and re-driven."""
    weed = services.Weed(workdir, name=f"weed-outage-{budget}")
    retries = {"within": {"FLEETTUNE_MAX_RETRIES": "10", "FLEETTUNE_RETRY_BACKOFF_MAX": "8",
                          "FLEETTUNE_REDRIVE_AFTER": "600"},
               "past": {"FLEETTUNE_MAX_RETRIES": "2", "FLEETTUNE_RETRY_BACKOFF_MAX": "1",
                        "FLEETTUNE_REDRIVE_AFTER": "2"}}[budget]
    env = services.service_env(redis_url.rsplit("/", 1)[0] + ("/11" if budget == "past" else "/13"), weed.endpoint,
                               bucket=f"fleettune-outage-{budget}", **retries)
    client = redis.Redis.from_url(env["FLEETTUNE_REDIS_URL"])
    api = services.Api(env, workdir)
    worker = services.Worker(f"outage-{budget}", env, workdir, beat=True, via_cli=True)
    try:
        federation, tokens, spec = _session(client, api.url, "outage", ["a", "b", "c"])
        plans = {}
        for i, (device, token) in enumerate(tokens.items()):
            device_client = DeviceClient(token, "outage", api.url)
            plan = device_client.check_in()
            blob = encode_update(random_deltas(spec, np.random.default_rng(i), 0.01))
            plans[device] = (device_client, plan, device_client.upload(plan, blob))
        weed.kill()  # S3 goes away after the uploads, before the submissions
        for device_client, plan, sha256 in plans.values():
            device_client.submit(plan, sha256, num_samples=5)  # the gateway does not need S3 to take them
        if budget == "past":
            _eventually(lambda: int(client.hget("ft:stats", "retries_exhausted") or 0) >= 3, timeout=60,
                        what="ingests to give up")
        else:
            time.sleep(8)
        assert federation.round(1)["status"] == "open" and federation.round(1)["accepted"] == 0
        weed.start()
        done = _eventually(lambda: federation.round(1)["status"] == "closed" and federation.round(1), timeout=90,
                           what="the round to close after S3 returned")
        assert done["contributors"] == ["a", "b", "c"]
        exhausted = int(client.hget("ft:stats", "retries_exhausted") or 0)
        assert exhausted == 0 if budget == "within" else int(client.hget("ft:stats", "redriven")) >= 3
        assert {k.decode(): int(v) for k, v in client.hgetall("ft:fed:outage:stats").items()} == \
            {"received": 3, "accepted": 3}
    finally:
        worker.stop()
        api.stop()
        weed.stop()


@pytest.mark.parametrize("moment", ["mid-ingest", "mid-close"])
def test_a_redis_kill_and_restart_with_aof_loses_and_doubles_nothing(moment, s3_endpoint, tmp_path_factory):
    import os
    import shutil
    import signal
    import subprocess

    workdir = tmp_path_factory.mktemp("redis-restart")
    port = services.free_port()
    args = [shutil.which("redis-server"), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(workdir),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--maxmemory-policy", "noeviction"]

    def start_redis():
        proc = subprocess.Popen(args, stdout=(workdir / "redis.log").open("a"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        _eventually(lambda: _pings(port), timeout=20, what="redis")
        return proc

    redis_proc = start_redis()
    env = services.service_env(f"redis://127.0.0.1:{port}/0", s3_endpoint, bucket=f"fleettune-restart-{moment}",
                               FLEETTUNE_REDRIVE_AFTER="3")
    client = redis.Redis(port=port)
    api = services.Api(env, workdir)
    workers = [services.Worker("r1", env, workdir, beat=True, via_cli=True), services.Worker("r2", env, workdir)]
    restarts = 0
    try:
        devices = [f"d{i}" for i in range(6)]
        # mid-close: 1B-class updates (6.8 MB each), so that the close lasts long enough to be hit
        model = "llama-1b" if moment == "mid-close" else "tiny-llama"
        federation, tokens, spec = _session(client, api.url, "restart", devices, model=model)
        for i, device in enumerate(devices):
            if i == 3 and moment == "mid-ingest":
                os.killpg(redis_proc.pid, signal.SIGKILL)  # three sent, being ingested
                redis_proc.wait()
                redis_proc = start_redis()
            device_client = DeviceClient(tokens[device], "restart", api.url)
            plan = _eventually(lambda: _try(device_client.check_in), what="check-in after the restart")
            device_client.send(plan, encode_update(random_deltas(spec, np.random.default_rng(i), 0.001)), num_samples=5)
        if moment == "mid-close":
            end = time.monotonic() + 60
            while client.hget("ft:fed:restart:round:1", "status") != b"closing":
                assert time.monotonic() < end, "the close never began"
                time.sleep(0.001)
            os.killpg(redis_proc.pid, signal.SIGKILL)  # the close is aggregating
            redis_proc.wait()
            redis_proc = start_redis()

        def settled():
            nonlocal restarts
            for n, w in enumerate(workers):  # the supervisor: restart what died (it exits non-zero)
                if not w.alive():
                    workers[n] = services.Worker(f"r{n + 1}-{restarts}", env, workdir, beat=n == 0, via_cli=True)
                    restarts += 1
            return federation.round(1)["status"] == "closed" and federation.round(1)

        done = _eventually(settled, timeout=120, what="the round to close")
        assert done["contributors"] == devices
        assert {k.decode(): int(v) for k, v in client.hgetall("ft:fed:restart:stats").items()} == \
            {"received": 6, "accepted": 6}
    finally:
        for w in workers:
            w.stop()
        api.stop()
        services._stop(redis_proc)


def _pings(port: int) -> bool:
    try:
        return redis.Redis(port=port).ping()
    except redis.ConnectionError:
        return False


def _try(call):
    from fleettune import FleettuneAPIError

    try:
        return call()
    except FleettuneAPIError as err:
        if err.status == 503:
            return None
        raise
