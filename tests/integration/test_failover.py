"""Redis failover under a stream of submissions: a primary, two replicas and three sentinels (real
redis-server and redis-sentinel), the API and a worker configured by FLEETTUNE_REDIS_SENTINELS, and
the primary SIGKILLed again and again while devices submit through the API.

A 202 receipt is given only once a replica holds the submission (FLEETTUNE_REDIS_MIN_REPLICAS=1,
WAIT), so a promotion loses none: the round, whose quorum is every device, closes with each device
counted once. Two API processes (`--workers 2`) and two workers, each with its beat, run through it.
FLEETTUNE_FAILOVER_KILLS sets the number of kills (CI keeps it small).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time

import numpy as np
import pytest

from fleettune import DeviceClient, Federation, FleettuneAPIError
from fleettune.shared.control.auth import Tokens
from fleettune.shared.protocol.updates import encode_update
from fleettune.workers.local import services
from tests.reference import random_deltas

pytestmark = pytest.mark.services
KILLS = int(os.environ.get("FLEETTUNE_FAILOVER_KILLS", "3"))
DEVICES = 40 + 25 * KILLS


def _retry(call, deadline: float, slowest: list[float]):
    """Call until it answers; a 503 or a refused connection means "retry" (the failover window)."""
    while True:
        started = time.monotonic()
        try:
            return call()
        except FleettuneAPIError as err:
            if err.status != 503:
                raise
        finally:
            slowest.append(time.monotonic() - started)
        assert time.monotonic() < deadline, "the API did not come back"
        time.sleep(0.1)


def test_failover_loses_no_acknowledged_submission(s3_endpoint, tmp_path_factory):
    import redis

    workdir = tmp_path_factory.mktemp("failover")
    group = services.SentinelGroup(workdir)
    env = services.service_env("redis://127.0.0.1:1/0", s3_endpoint, bucket="fleettune-failover",
                               FLEETTUNE_REDIS_SENTINELS=group.addresses, FLEETTUNE_REDIS_SERVICE=group.SERVICE,
                               FLEETTUNE_REDIS_MIN_REPLICAS="1", FLEETTUNE_REDIS_WAIT_MS="1000",
                               FLEETTUNE_REDRIVE_AFTER="5")
    api = services.Api(env, workdir, args=("--workers", "2"))  # two API processes, two workers each with beat
    workers = [services.Worker(f"fo{n}", env, workdir, concurrency=1, beat=True, via_cli=True) for n in (1, 2)]
    try:
        primary = lambda: redis.Redis(port=group.primary())  # noqa: E731
        federation = Federation(Tokens(primary()).create_api_key("admin", "failover")[1], "failover", api.url)
        federation.create(model="tiny-llama")
        tokens = {f"d{i:03d}": federation.register_device(f"d{i:03d}") for i in range(DEVICES)}
        federation.train(model="tiny-llama", rounds=1, min_updates=DEVICES,
                         round_config={"timeout_seconds": 900}, wait_started=60)
        from fleettune.shared.federation import FederationConfig

        spec = FederationConfig.from_json(primary().get("ft:fed:failover:config")).spec.tensors
        rng = np.random.default_rng(11)
        blobs = {d: encode_update(random_deltas(spec, rng, 0.001)) for d in tokens}

        acknowledged: dict[str, dict] = {}
        acked_at: list[float] = []
        acked_times: dict[str, float] = {}
        kill_times: list[tuple[float, int]] = []
        slowest: list[float] = []
        errors: list[BaseException] = []

        def stream() -> None:
            try:
                for device, token in tokens.items():
                    client = DeviceClient(token, "failover", api.url)
                    deadline = time.monotonic() + 90
                    plan = _retry(client.check_in, deadline, slowest)
                    sha256 = hashlib.sha256(blobs[device]).hexdigest()
                    _retry(lambda: _upload_once(client, plan, blobs[device]), deadline, slowest)
                    acknowledged[device] = _retry(lambda: client.submit(plan, sha256, num_samples=5), deadline,
                                                  slowest)
                    acked_at.append(time.monotonic())
                    acked_times[device] = round(acked_at[-1], 2)
                    time.sleep(0.05)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        streamer = threading.Thread(target=stream, daemon=True)
        streamer.start()
        recoveries = []
        for _ in range(KILLS):
            before = len(acked_at)
            _until(lambda: len(acked_at) >= before + 5 or not streamer.is_alive(), 90, "submissions between kills")
            if not streamer.is_alive():
                break
            killed_port = group.kill_primary()
            killed = time.monotonic()
            kill_times.append((round(killed, 2), killed_port))
            _until(lambda: group.primary() not in (None, killed_port), 30, "a promotion")
            _until(lambda: any(t > killed for t in acked_at) or not streamer.is_alive(), 60, "a 202 after the kill")
            recoveries.append(min(t for t in acked_at if t > killed) - killed if acked_at[-1] > killed else 60.0)
            group.restart(killed_port)  # its host comes back: the sentinels make it a replica
            for n, w in enumerate(workers):  # the supervisor: restart what died
                if not w.alive():
                    workers[n] = services.Worker(f"fo-{time.monotonic_ns()}", env, workdir, concurrency=1, beat=True,
                                                 via_cli=True)
        streamer.join(300)
        assert not errors, errors
        assert len(acknowledged) == DEVICES

        try:
            round_one = _until(lambda: (r := federation.round(1))["status"] in ("closed", "failed") and r, 180,
                               "round 1 to close")
        except AssertionError:
            client = primary()
            missing = sorted(set(acknowledged) - set(federation.round(1)["contributors"]))
            traces = {d: (client.exists(f"ft:rcv:{acknowledged[d]['receipt']}"),
                          client.get(f"ft:msg:{acknowledged[d]['receipt']}"), acked_times.get(d)) for d in missing}
            raise AssertionError(f"missing {traces}; kills at {kill_times}; round 1: {federation.round(1)}; queue {client.llen('fleettune.ingest')}, unacked "
                                 f"{client.hlen('unacked')} {client.zrange('unacked_index', 0, -1, withscores=True)}, "
                                 f"pending {client.zrange('ft:received:pending', 0, -1, withscores=True)} at "
                                 f"{time.time()}, redrives {client.hgetall('ft:redrives')}") from None
        contributors = set(round_one["contributors"])
        lost = len(set(acknowledged) - contributors)
        stats = {k.decode(): int(v) for k, v in primary().hgetall("ft:fed:failover:stats").items()}
        doubled = stats.get("accepted", 0) - len(contributors)
        print(f"failover: {len(recoveries)} primary kills, acknowledged lost {lost}, doubled {doubled}, "
              f"worst recovery {max(recoveries, default=0):.1f} s (slowest answer {max(slowest):.1f} s)")
        assert len(recoveries) == KILLS
        assert round_one["status"] == "closed" and lost == 0 and doubled == 0
        assert max(recoveries) <= 15 and max(slowest) < 15  # 503s during the failover, never a hang
    finally:
        for w in workers:
            w.stop()
        api.stop()
        group.stop()


def _upload_once(client: DeviceClient, plan: dict, blob: bytes) -> None:
    try:
        client.upload(plan, blob)
    except FleettuneAPIError as err:
        if err.status != 412:  # write-once: an earlier try stored these bytes already
            raise


def _until(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < end, f"{what}: not within {timeout}s"
        time.sleep(0.05)
    return value
