"""Ingest rate with 1 and 2 worker processes against a raw S3 GET + sha256 of the same objects.

    python bench/ingest_rate.py [--updates 130] [--layout llama-1b]

Starts its own redis-server and SeaweedFS (`weed mini`). Baseline: this process GETs every object
from S3 and hashes it, one at a time. Pipeline: the same objects go through envelope -> Redis
queue -> Celery worker processes (one pool process each: GET, sha256, strict parse, norm, clip,
exactly-once accept, fold into a partial sum, and a partial commit every 64 updates); timed from
the first enqueue to the last accepted update, after one warm-up update per process. One
federation per process count, so each run ingests fresh messages. The rounds are mid-flight: the
cohort holds 1,000 devices that never report, so the commit at every update of a round's last
few (FLEETTUNE_FOLD_TAIL, which buys close latency) is not measured here but in
bench/close_latency.py. Goals: >= 0.6 of the raw rate per process, >= 1.6x from 1 to 2 processes.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleettune.shared import keys  # noqa: E402
from fleettune.shared.protocol.adapter_spec import LAYOUTS  # noqa: E402
from fleettune.shared.protocol.envelope import Envelope  # noqa: E402
from fleettune.shared.federation import FederationConfig, RoundPolicy  # noqa: E402
from fleettune.shared.runtime import Runtime  # noqa: E402
from fleettune.shared.settings import Settings  # noqa: E402
from fleettune.shared.protocol.updates import encode_update  # noqa: E402
from fleettune.workers.local import services  # noqa: E402
from fleettune.workers.worker.app import INGEST_QUEUE, make_app  # noqa: E402


def prepare(runtime: Runtime, name: str, layout: str, n: int) -> tuple[list[bytes], int]:
    """A federation whose round stays open, and n update objects in S3: (envelopes, bytes)."""
    devices = [f"d{i:04d}" for i in range(n)]
    config = FederationConfig(name, LAYOUTS[layout], policy=RoundPolicy(min_updates=1, max_rounds=1))
    runtime.coordinator.start(config, devices + [f"silent-{i}" for i in range(1000)])
    rng = np.random.default_rng(0)
    envelopes, total = [], 0
    for device in devices:
        blob = encode_update({k: rng.standard_normal(s, dtype=np.float32) * 1e-3 for k, s in config.spec.tensors.items()})
        key = keys.update_object(name, 1, device)
        runtime.store.put(key, blob)
        envelopes.append(Envelope(name, 1, device, key, hashlib.sha256(blob).hexdigest(), 10, 0).encode())
        total += len(blob)
    return envelopes, total


def wait_accepted(runtime: Runtime, name: str, count: int) -> None:
    while runtime.state.federations.stats(name).get("accepted", 0) < count:
        time.sleep(0.005)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=130)
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="llama-1b")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="ft-ingest-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)  # the S3 data can be gigabytes
    with services.redis_server(workdir) as redis_url, services.s3_server(workdir) as s3:
        env = services.service_env(redis_url, s3, bucket="bench", FLEETTUNE_TASK_TIME_LIMIT="60",
                                   FLEETTUNE_VISIBILITY_TIMEOUT="120")
        settings = Settings.from_env(env)
        runtime = Runtime.from_settings(settings)
        app = make_app(settings)
        runs = {p: prepare(runtime, f"bench{p}", args.layout, args.updates + p) for p in (1, 2)}
        envelopes, total = runs[1]
        per_update = total / len(envelopes)
        start = time.perf_counter()
        for i in range(1, len(envelopes)):  # the same objects the 1-process run ingests
            hashlib.sha256(runtime.store.get(keys.update_object("bench1", 1, f"d{i:04d}"))).hexdigest()
        raw_rate = (len(envelopes) - 1) / (time.perf_counter() - start)
        # the same with two threads (both GIL-free: socket reads and hashing): how far these two
        # cores, shared with the S3 server and Redis, let two readers go at all
        start = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda i: hashlib.sha256(runtime.store.get(
                keys.update_object("bench2", 1, f"d{i:04d}"))).hexdigest(), range(2, len(envelopes))))
        raw_rate_2 = (len(envelopes) - 2) / (time.perf_counter() - start)

        rates = {}
        for processes, (envelopes, _) in runs.items():
            workers = [services.Worker(f"bench{processes}-{i}", env, workdir, concurrency=1)
                       for i in range(processes)]
            try:
                # each process's first task pays for connections and lazy imports: keep it out
                warm, timed = envelopes[:processes], envelopes[processes:]
                for raw in warm:
                    app.send_task("fleettune.ingest", args=[raw], queue=INGEST_QUEUE)
                wait_accepted(runtime, f"bench{processes}", processes)
                start = time.perf_counter()
                for raw in timed:
                    app.send_task("fleettune.ingest", args=[raw], queue=INGEST_QUEUE)
                wait_accepted(runtime, f"bench{processes}", len(envelopes))
                rates[processes] = len(timed) / (time.perf_counter() - start)
            finally:
                for w in workers:
                    w.stop()
    print(f"{args.updates} updates of {per_update / 1e6:.2f} MB ({args.layout} r=8 q/k/v/o), one pool process per worker")
    print(f"raw S3 GET + sha256 (one thread): {raw_rate:7.1f} updates/s; two threads: {raw_rate_2:7.1f} "
          f"({raw_rate_2 / raw_rate:.2f}x: the ceiling these cores leave two readers)")
    for processes, rate in rates.items():
        print(f"pipeline ingest, {processes} process{'es' if processes > 1 else ''}:   {rate:7.1f} updates/s "
              f"= {rate / raw_rate / processes:.2f} of raw per process")
    print(f"ratio ingest/raw (1 process) = {rates[1] / raw_rate:.2f} (goal >= 0.60); "
          f"2 processes / 1 = {rates[2] / rates[1]:.2f}x (goal >= 1.6x)")


if __name__ == "__main__":
    main()
