"""A soak: federations training under a steady stream while workers, the API and Redis replicas die.

    python bench/soak.py [--minutes 120] [--federations 5] [--devices 4] [--kill-every 180]

Starts a Redis primary with two replicas and three sentinels, SeaweedFS, one `fleettune api` and
two workers (the first with beat), all through Sentinel, with receipts waiting for the replicas.
Each federation streams rounds of its devices (check-in, upload, submit through the API, then the
next round) for `--minutes`; every `--kill-every` seconds one process, chosen at random, is SIGKILLed
and restarted as a supervisor would: a worker, the API, or a Redis replica. Every minute it samples
each process's RSS (with its children), Redis's used memory and the objects in the store. At the end
it prints the growth of each, and the accounting: receipts given, messages received, outcomes.
Retention is short (FLEETTUNE_RETENTION=300) so that memory and objects can level off.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleettune import DeviceClient, Federation, FleettuneAPIError  # noqa: E402
from fleettune.shared.control.auth import Tokens  # noqa: E402
from fleettune.shared.federation import FederationConfig  # noqa: E402
from fleettune.shared.storage import S3ObjectStore  # noqa: E402
from fleettune.shared.protocol.updates import encode_update  # noqa: E402
from fleettune.workers.local import services  # noqa: E402


def rss_mb(proc) -> float:
    try:
        root = psutil.Process(proc.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20
    except psutil.NoSuchProcess:
        return 0.0


def call(fn, stop: threading.Event):
    """Retry through 503s and refused connections (a process or Redis being replaced)."""
    while not stop.is_set():
        try:
            return fn()
        except FleettuneAPIError as err:
            if err.status not in (409, 503) and err.code != "already_uploaded":
                raise
            if err.code == "already_uploaded":
                return None
        except OSError:
            pass
        time.sleep(0.5)
    return None


def stream(api_url: str, fed: str, tokens: dict[str, str], spec: dict, stop: threading.Event, acked: set[str],
           errors: list[BaseException]) -> None:
    rng = np.random.default_rng(abs(hash(fed)) % 2**32)
    try:
        while not stop.is_set():
            for device, token in tokens.items():
                client = DeviceClient(token, fed, api_url)
                plan = call(client.check_in, stop)
                if plan is None or plan.get("action") != "train":
                    continue
                blob = encode_update({k: (rng.standard_normal(shape) * 0.001).astype(np.float32) for k, shape in spec.items()})
                call(lambda: client.upload(plan, blob), stop)
                receipt = call(lambda: client.submit(plan, hashlib.sha256(blob).hexdigest(), num_samples=5), stop)
                if receipt is not None:
                    acked.add(receipt["receipt"])
            time.sleep(1.0)
    except BaseException as exc:
        errors.append(exc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=120)
    parser.add_argument("--federations", type=int, default=5)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--kill-every", type=float, default=180)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="ft-soak-"))
    group, weed = services.SentinelGroup(workdir), services.Weed(workdir)
    env = services.service_env("redis://127.0.0.1:1/0", weed.endpoint, bucket="soak",
                               FLEETTUNE_REDIS_SENTINELS=group.addresses, FLEETTUNE_REDIS_SERVICE=group.SERVICE,
                               FLEETTUNE_REDIS_MIN_REPLICAS="1", FLEETTUNE_RETENTION="300",
                               FLEETTUNE_MESSAGE_TTL="3600", FLEETTUNE_REDRIVE_AFTER="30")
    api = services.Api(env, workdir)
    workers = [services.Worker(f"s{n}", env, workdir, concurrency=1, beat=n == 0, via_cli=True) for n in range(2)]
    primary = lambda: redis.Redis(port=group.primary())  # noqa: E731
    store = S3ObjectStore.connect(weed.endpoint, services.S3_KEY, services.S3_SECRET, "soak")
    stop, errors, acked = threading.Event(), [], {}
    try:
        admin = Tokens(primary()).create_api_key("admin", "soak")[1]
        threads = []
        for f in range(args.federations):
            fed = f"soak-{f}"
            federation = Federation(admin, fed, api.url)
            federation.create(model="tiny-llama")
            tokens = {f"d{i}": federation.register_device(f"d{i}") for i in range(args.devices)}
            federation.train(model="tiny-llama", rounds=100_000, min_updates=args.devices,
                             round_config={"timeout_seconds": 60})
            spec = FederationConfig.from_json(primary().get(f"ft:fed:{fed}:config")).spec.tensors
            acked[fed] = set()
            threads.append(threading.Thread(target=stream, args=(api.url, fed, tokens, spec, stop, acked[fed], errors),
                                            daemon=True))
        for t in threads:
            t.start()
        samples, kills = [], []
        started = last_kill = time.monotonic()
        end = started + args.minutes * 60
        rng = random.Random(7)
        while time.monotonic() < end and not errors:
            time.sleep(5)
            if time.monotonic() - last_kill >= args.kill_every:
                victim = rng.choice(["worker", "api", "replica"])
                if victim == "worker":
                    n = rng.randrange(len(workers))
                    workers[n].kill()
                    workers[n] = services.Worker(f"s{n}-{len(kills)}", env, workdir, concurrency=1, beat=n == 0,
                                                 via_cli=True)
                elif victim == "api":
                    api.kill()
                    api.start()
                else:
                    port = rng.choice([p for p in group.ports if p != group.primary()])
                    group.nodes[port].kill()
                    group.nodes[port].wait()
                    group.restart(port)
                kills.append(victim)
                last_kill = time.monotonic()
            if not samples or time.monotonic() - samples[-1]["t"] >= 60:
                samples.append({"t": time.monotonic(), "api": rss_mb(api.proc),
                                **{f"worker{n}": rss_mb(w.proc) for n, w in enumerate(workers)},
                                "redis_mb": primary().info("memory")["used_memory"] / 2**20,
                                "objects": sum(1 for _ in store.client.list_objects("soak", recursive=True))})
                print({k: round(v, 1) for k, v in samples[-1].items() if k != "t"}, flush=True)
        stop.set()
        for t in threads:
            t.join(120)
        time.sleep(60)  # the last messages settle
        client = primary()
        print(f"soak: {args.minutes:g} min, {args.federations} federations, kills {len(kills)} "
              f"({', '.join(f'{k} {kills.count(k)}' for k in sorted(set(kills)))}), errors {errors[:1]}")
        for fed, receipts in acked.items():
            stats = {k.decode(): int(v) for k, v in client.hgetall(f"ft:fed:{fed}:stats").items()}
            outcomes = sum(v for k, v in stats.items() if k == "accepted" or k.startswith("rejected"))
            rounds = int(client.hget(f"ft:fed:{fed}:state", "round") or 0)
            print(f"  {fed}: receipts {len(receipts)}, received {stats.get('received', 0)}, outcomes {outcomes} "
                  f"({stats}), rounds {rounds}")
        if len(samples) >= 3:
            first, last = samples[1], samples[-1]  # after the first minute's warm-up
            for key in first:
                if key != "t" and first[key]:
                    print(f"  {key}: {first[key]:.1f} -> {last[key]:.1f} ({last[key] / first[key]:.2f}x)")
    finally:
        stop.set()
        for w in workers:
            w.stop()
        api.stop()
        group.stop()
        weed.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
