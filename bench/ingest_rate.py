"""End-to-end ingest rate of one worker process against a raw S3 GET + sha256 of the same objects.

    python bench/ingest_rate.py [--updates 60]

Starts its own redis-server, SeaweedFS (`weed mini`) and one Celery worker with one pool process.
Baseline: this process GETs every object from S3 and hashes it. Pipeline: the same objects go
through envelope -> Redis queue -> worker (GET, sha256, strict parse, norm, clip, exactly-once
record); timed from the first enqueue to the last accepted update, after one warm-up update.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared import keys  # noqa: E402
from shared.adapter_spec import LAYOUTS  # noqa: E402
from shared.envelope import Envelope  # noqa: E402
from shared.federation import FederationConfig, RoundPolicy  # noqa: E402
from shared.runtime import Runtime  # noqa: E402
from shared.settings import Settings  # noqa: E402
from shared.submit import encode_update  # noqa: E402
from tests import services  # noqa: E402
from workers.app import INGEST_QUEUE, make_app  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=60)
    parser.add_argument("--pool", choices=["prefork", "solo"], default="prefork",
                        help="prefork with one child, or solo: the worker process runs tasks itself")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="ft-ingest-"))
    with services.redis_server(workdir) as redis_url, services.s3_server(workdir) as s3:
        env = services.service_env(redis_url, s3, bucket="bench", FLEETTUNE_TASK_TIME_LIMIT="60",
                                   FLEETTUNE_VISIBILITY_TIMEOUT="120")
        settings = Settings.from_env(env)
        runtime = Runtime.from_settings(settings)
        devices = [f"d{i:04d}" for i in range(args.updates + 1)]  # d0000 warms the worker up
        config = FederationConfig("bench", LAYOUTS["llama-1b"], policy=RoundPolicy(min_updates=1, max_rounds=1))
        runtime.coordinator.start(config, devices + ["never-reports"])  # keeps the round open
        rng = np.random.default_rng(0)
        envelopes, sizes = [], []
        for device in devices:
            blob = encode_update({k: rng.standard_normal(s, dtype=np.float32) * 1e-3
                                  for k, s in config.spec.tensors.items()})
            key = keys.update_object("bench", 1, device)
            runtime.store.put(key, blob)
            envelopes.append(Envelope("bench", 1, device, key, hashlib.sha256(blob).hexdigest(), 10, 0).encode())
            sizes.append(len(blob))

        warmup, envelopes, devices = envelopes[0], envelopes[1:], devices[1:]
        total = sum(sizes[1:])
        start = time.perf_counter()
        for device in devices:
            hashlib.sha256(runtime.store.get(keys.update_object("bench", 1, device))).hexdigest()
        raw_s = time.perf_counter() - start

        worker = services.Worker("bench", env, workdir, concurrency=1, pool=args.pool)
        try:
            app = make_app(settings)
            # the first task pays for connections and lazy imports: keep it out of the rate
            app.send_task("fleettune.ingest", args=[warmup], queue=INGEST_QUEUE)
            while runtime.state.stats("bench").get("accepted", 0) < 1:
                time.sleep(0.005)
            start = time.perf_counter()
            for raw in envelopes:
                app.send_task("fleettune.ingest", args=[raw], queue=INGEST_QUEUE)
            while runtime.state.stats("bench").get("accepted", 0) < len(devices) + 1:
                time.sleep(0.005)
            ingest_s = time.perf_counter() - start
        finally:
            worker.stop()
    mb = total / 1e6
    print(f"{len(devices)} updates of {mb / len(devices):.1f} MB (llama-1b r=8 q/k/v/o), one worker process ({args.pool} pool)")
    print(f"raw S3 GET + sha256: {len(devices) / raw_s:7.1f} updates/s  {mb / raw_s:7.1f} MB/s")
    print(f"pipeline ingest:     {len(devices) / ingest_s:7.1f} updates/s  {mb / ingest_s:7.1f} MB/s")
    print(f"ratio ingest/raw = {raw_s / ingest_s:.2f} (goal >= 0.60)")


if __name__ == "__main__":
    main()
