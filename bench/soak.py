"""A soak: federations training under a steady stream while workers, the API and Redis replicas die.

    python bench/soak.py [--minutes 120] [--federations 5] [--devices 4] [--kill-every 180] [--json out.json]

Starts a Redis primary with two replicas and three sentinels, SeaweedFS, one `fleettune api` and
two workers (the first with beat), all through Sentinel, with receipts waiting for the replicas.
Each federation streams rounds of its devices (check-in, upload, submit through the API, then the
next round) for `--minutes`; every `--kill-every` seconds one process, chosen at random, is SIGKILLed
and restarted as a supervisor would: the second worker, the API, or a Redis replica. The first
worker (with beat) is never killed, so one process's memory is followed over the whole run.

Every minute it samples each process's RSS (with its children), Redis's used memory and the objects
in the store, and checks that every receipt older than two minutes has its one outcome. At the end
it prints, and with --json writes:
    RSS growth of the long-lived worker (from its 5th minute, or its 2nd in runs under 15 min, to
        the end) and of the longest-lived incarnation of the API and of the killed worker;
    Redis memory and the update and partial-sum objects from the same point to the end (retention
        is short, FLEETTUNE_RETENTION=300, rounds keep their history for 500 rounds
        (FLEETTUNE_HISTORY_ROUNDS), and message outcomes live an hour, the least allowed: Redis
        levels off after that hour, so runs over 80 min measure its level from minute 65;
        published versions are kept for good and counted apart), and the Redis key classes that
        grew most over the same span;
    the accounting: receipts, receipts with no outcome (lost), outcomes beyond the receipts (doubled).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
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


ACKED_LOCK = threading.Lock()  # guards every federation's receipts dict (device threads and the checker)


def rss_mb(proc) -> float:
    try:
        root = psutil.Process(proc.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20
    except psutil.NoSuchProcess:
        return 0.0


def call(fn, stop: threading.Event):
    """Retry through 503s and refused connections (a process or Redis being replaced), and wait out 429s."""
    while not stop.is_set():
        try:
            return fn()
        except FleettuneAPIError as err:
            if err.code == "already_uploaded":
                return None
            if err.status == 429:  # a device keeps to its rate limit: wait for the next window
                stop.wait(10)
                continue
            if err.status not in (409, 503):
                raise
        except (OSError, httpx.TransportError):  # the API being replaced
            pass
        time.sleep(0.5)
    return None


class Incarnation:
    """One run of one process (a restart is a new incarnation): RSS samples by age."""

    def __init__(self, kind: str, proc) -> None:
        self.kind, self.proc, self.born, self.samples = kind, proc, time.monotonic(), []

    def sample(self) -> None:
        self.samples.append((time.monotonic() - self.born, rss_mb(self.proc)))

    def growth(self, from_age: float) -> tuple[float, float, float] | None:
        """(RSS at `from_age`, RSS at the last sample, lifetime in minutes), or None if it died younger."""
        later = [(age, mb) for age, mb in self.samples if age >= from_age and mb > 0]
        if len(later) < 2:
            return None
        return later[0][1], later[-1][1], later[-1][0] / 60


def stream(api_url: str, fed: str, tokens: dict[str, str], spec: dict, stop: threading.Event, acked: dict[str, float | None],
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
                    with ACKED_LOCK:
                        acked.setdefault(receipt["receipt"], time.time())  # a repeat keeps its first time
            time.sleep(1.0)
    except BaseException as exc:
        errors.append(exc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=120)
    parser.add_argument("--federations", type=int, default=5)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--kill-every", type=float, default=180)
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    args = parser.parse_args()
    summary = soak(args.minutes, args.federations, args.devices, args.kill_every)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


def soak(minutes: float, federations: int, devices: int, kill_every: float) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="ft-soak-"))
    group, weed = services.SentinelGroup(workdir), services.Weed(workdir)
    env = services.service_env("redis://127.0.0.1:1/0", weed.endpoint, bucket="soak",
                               FLEETTUNE_REDIS_SENTINELS=group.addresses, FLEETTUNE_REDIS_SERVICE=group.SERVICE,
                               FLEETTUNE_REDIS_MIN_REPLICAS="1", FLEETTUNE_RETENTION="300",
                               FLEETTUNE_MESSAGE_TTL="3600", FLEETTUNE_REDRIVE_AFTER="30",
                               FLEETTUNE_HISTORY_ROUNDS="500")
    api = services.Api(env, workdir)
    workers = [services.Worker(f"s{n}", env, workdir, concurrency=1, beat=n == 0, via_cli=True) for n in range(2)]
    lives = [Incarnation("worker-beat", workers[0].proc), Incarnation("worker", workers[1].proc),
             Incarnation("api", api.proc)]
    primary = lambda: redis.Redis(port=group.primary())  # noqa: E731
    store = S3ObjectStore.connect(weed.endpoint, services.S3_KEY, services.S3_SECRET, "soak")
    stop, errors, acked = threading.Event(), [], {}
    from_age = 300 if minutes >= 15 else 120
    level_from = 65 * 60 if minutes > 80 else from_age  # message outcomes (1 h TTL) accumulate until then
    census_from = None
    try:
        admin = Tokens(primary()).create_api_key("admin", "soak")[1]
        threads = []
        for f in range(federations):
            fed = f"soak-{f}"
            federation = Federation(admin, fed, api.url)
            federation.create(model="tiny-llama")
            tokens = {f"d{i}": federation.register_device(f"d{i}") for i in range(devices)}
            federation.train(model="tiny-llama", rounds=100_000, min_updates=devices,
                             round_config={"timeout_seconds": 60})
            spec = FederationConfig.from_json(primary().get(f"ft:fed:{fed}:config")).spec.tensors
            acked[fed] = {}
            threads.append(threading.Thread(target=stream, args=(api.url, fed, tokens, spec, stop, acked[fed], errors),
                                            daemon=True))
        for t in threads:
            t.start()
        samples, kills, lost = [], [], {}
        started = last_kill = time.monotonic()
        end = started + minutes * 60
        rng = random.Random(7)
        while time.monotonic() < end and not errors:
            time.sleep(5)
            if time.monotonic() - last_kill >= kill_every:
                victim = rng.choice(["worker", "api", "replica"])
                if victim == "worker":
                    workers[1].kill()
                    workers[1] = services.Worker(f"s1-{len(kills)}", env, workdir, concurrency=1, via_cli=True)
                    lives.append(Incarnation("worker", workers[1].proc))
                elif victim == "api":
                    api.kill()
                    api.start()
                    lives.append(Incarnation("api", api.proc))
                else:
                    port = rng.choice([p for p in group.ports if p != group.primary()])
                    group.nodes[port].kill()
                    group.nodes[port].wait()
                    group.restart(port)
                kills.append(victim)
                last_kill = time.monotonic()
            if not samples or time.monotonic() - samples[-1]["t"] >= 60:
                for life in lives:
                    if life.proc.poll() is None:
                        life.sample()
                objects = [o.object_name for o in store.client.list_objects("soak", recursive=True)]
                samples.append({"t": time.monotonic(), "redis_mb": primary().info("memory")["used_memory"] / 2**20,
                                "updates": sum(o.startswith("updates/") for o in objects),
                                "partials": sum(o.startswith("partials/") for o in objects),
                                "versions": sum(o.startswith("federations/") for o in objects)})
                if census_from is None and time.monotonic() - started >= level_from:
                    census_from = key_census(primary())
                lost = check_outcomes(primary(), acked, older_than=120)
                print({k: round(v, 1) for k, v in samples[-1].items() if k != "t"},
                      {life.kind: round(life.samples[-1][1]) for life in lives if life.samples}, flush=True)
        stop.set()
        for t in threads:
            t.join(120)
        settle_until = time.monotonic() + 120
        while (lost := check_outcomes(primary(), acked, older_than=0)) and time.monotonic() < settle_until:
            time.sleep(2)  # the last messages settle
        growth = census_growth(census_from, key_census(primary())) if census_from is not None else []
        return report(primary(), minutes, federations, kills, errors, acked, lost, lives, samples, from_age, started,
                      level_from, growth)
    finally:
        stop.set()
        for w in workers:
            w.stop()
        api.stop()
        group.stop()
        weed.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def key_census(client: redis.Redis) -> dict[str, list[int]]:
    """Redis's keys by class (numbers and digests blanked): class -> [keys, bytes]. Says what grows."""
    census: dict[str, list[int]] = {}
    batch: list[bytes] = []

    def flush() -> None:
        with client.pipeline(transaction=False) as pipe:
            for key in batch:
                pipe.memory_usage(key)
            sizes = pipe.execute()
        for key, size in zip(batch, sizes):
            name = re.sub(r"[0-9a-f]{32,}", "{digest}", key.decode(errors="replace"))
            entry = census.setdefault(re.sub(r"\d+", "{n}", name), [0, 0])
            entry[0] += 1
            entry[1] += size or 0
        batch.clear()

    for key in client.scan_iter(count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            flush()
    flush()
    return census


def census_growth(before: dict[str, list[int]], after: dict[str, list[int]], top: int = 8) -> list[dict]:
    """The key classes that grew most in bytes between two censuses."""
    rows = [{"keys": name, "count": after.get(name, [0, 0])[0] - before.get(name, [0, 0])[0],
             "bytes": after.get(name, [0, 0])[1] - before.get(name, [0, 0])[1]} for name in set(before) | set(after)]
    return sorted(rows, key=lambda r: -abs(r["bytes"]))[:top]


def check_outcomes(client: redis.Redis, acked: dict[str, dict[str, float]], older_than: float) -> dict[str, int]:
    """Forget the receipts that have their outcome; count, per federation, those older than
    `older_than` seconds that have none yet."""
    now, missing = time.time(), {}
    for fed, receipts in acked.items():
        with ACKED_LOCK:  # the device threads add receipts while this reads them
            pending = [(r, at) for r, at in receipts.items() if at is not None and now - at >= older_than]
        with client.pipeline(transaction=False) as pipe:
            for receipt, _ in pending:
                pipe.exists(f"ft:msg:{receipt}")
            found = pipe.execute()
        with ACKED_LOCK:
            for (receipt, _), present in zip(pending, found):
                if present:
                    receipts[receipt] = None  # settled: kept only to count receipts
        missing[fed] = sum(1 for (_, _), present in zip(pending, found) if not present)
    return {fed: n for fed, n in missing.items() if n}


def report(client, minutes, federations, kills, errors, acked, lost, lives, samples, from_age, started, level_from,
           growth) -> dict:
    accounting = {}
    for fed, receipts in acked.items():
        stats = {k.decode(): int(v) for k, v in client.hgetall(f"ft:fed:{fed}:stats").items()}
        # "rejected" is the total of the "rejected:<reason>" counters: count the reasons only
        outcomes = stats.get("accepted", 0) + sum(v for k, v in stats.items() if k.startswith("rejected:"))
        accounting[fed] = {"receipts": len(receipts), "outcomes": outcomes, "lost": lost.get(fed, 0),
                           "doubled": max(0, outcomes - len(receipts)),
                           "rounds": int(client.hget(f"ft:fed:{fed}:state", "round") or 0), "stats": stats}
    rss = {}
    for kind in ("worker-beat", "worker", "api"):
        grown = [g for life in lives if life.kind == kind and (g := life.growth(from_age))]
        if grown:
            first, last, lived = max(grown, key=lambda g: g[2])  # the longest-lived incarnation
            rss[kind] = {"from_mb": round(first, 1), "to_mb": round(last, 1), "growth": round(last / first, 3),
                         "minutes": round(lived, 1)}
    steady = [s for s in samples if s["t"] - started >= level_from]
    levels = {k: {"from": round(steady[0][k], 1), "to": round(steady[-1][k], 1),
                  "max": round(max(s[k] for s in steady), 1)}
              for k in ("redis_mb", "updates", "partials", "versions")} if len(steady) >= 2 else {}
    summary = {"minutes": minutes, "federations": federations, "kills": {k: kills.count(k) for k in sorted(set(kills))},
               "errors": [repr(e) for e in errors[:3]], "accounting": accounting, "rss": rss, "levels": levels,
               "levels_from_minute": round(level_from / 60, 1), "redis_growth_by_key": growth,
               "lost": sum(a["lost"] for a in accounting.values()),
               "doubled": sum(a["doubled"] for a in accounting.values())}
    print(f"soak: {minutes:g} min, {federations} federations, {len(kills)} kills "
          f"({', '.join(f'{k} {n}' for k, n in summary['kills'].items())}), errors {summary['errors']}")
    for fed, a in accounting.items():
        print(f"  {fed}: {a['rounds']} rounds, receipts {a['receipts']}, outcomes {a['outcomes']}, "
              f"lost {a['lost']}, doubled {a['doubled']}")
    for kind, r in rss.items():
        print(f"  RSS {kind}: {r['from_mb']} -> {r['to_mb']} MB ({r['growth']:.3f}x over {r['minutes']} min)")
    for key, level in levels.items():
        print(f"  {key}: {level['from']} -> {level['to']} (max {level['max']})")
    for row in growth:
        print(f"  Redis {row['keys']}: {row['count']:+d} keys, {row['bytes'] / 1024:+.1f} KiB")
    print(f"soak: acknowledged lost {summary['lost']}, doubled {summary['doubled']}, worst RSS growth "
          f"{max((r['growth'] for r in rss.values()), default=float('nan')):.3f}x")
    return summary


if __name__ == "__main__":
    main()
