"""What a replicated receipt costs: the gateway's submit with and without waiting for the replicas.

    python bench/replicated_submit.py [--submits 3000] [--concurrency 32]

Starts a Redis primary with two replicas and three sentinels (redis-server, redis-sentinel), then
one `fleettune api` found through the sentinels, twice: FLEETTUNE_REDIS_MIN_REPLICAS=0 (a 202 once
the primary has the submission) and 1 (once every connected replica has it: INFO, then the ledger
script and WAIT on one connection). Prints p50 latency one request at a time, throughput under
`--concurrency` clients, and the ratios of the two, measured in this one run.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis  # noqa: E402
from gateway_submit import body, flood, p50_ms  # noqa: E402

from fleettune import Federation  # noqa: E402
from fleettune.shared.control.auth import Tokens  # noqa: E402
from fleettune.workers.local import services  # noqa: E402


def measure(group: services.SentinelGroup, workdir: Path, replicas: int, args) -> tuple[float, float]:
    env = services.service_env("redis://127.0.0.1:1/0", "unused:1", bucket="bench", FLEETTUNE_DEVICE_RATE_LIMIT="1000000",
                               FLEETTUNE_REDIS_SENTINELS=group.addresses, FLEETTUNE_REDIS_SERVICE=group.SERVICE,
                               FLEETTUNE_REDIS_MIN_REPLICAS=str(replicas))
    env.pop("FLEETTUNE_S3_ENDPOINT")  # submits never touch the store
    env["FLEETTUNE_DATA_DIR"] = str(workdir / "data")
    api = services.Api(env, workdir)
    fed = f"bench{replicas}"
    try:
        admin = Tokens(redis.Redis(port=group.primary())).create_api_key("admin", "bench")[1]
        federation = Federation(admin, fed, api.url)
        federation.create(model="tiny-llama")
        tokens = [federation.register_device(f"d{i:04d}") for i in range(args.devices)]
        latency = []
        with httpx.Client(base_url=api.url, timeout=30) as http:
            for i in range(args.latency_samples):
                started = time.perf_counter()
                response = http.post(f"/api/v1/federations/{fed}/updates", json=body(i),
                                     headers={"Authorization": f"Bearer {tokens[i % len(tokens)]}"})
                latency.append(time.perf_counter() - started)
                assert response.status_code == 202, response.text
        rate = asyncio.run(flood(api.url, tokens, fed, args.submits, args.concurrency))
    finally:
        api.stop()
    return p50_ms(latency), rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submits", type=int, default=3000)
    parser.add_argument("--latency-samples", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--devices", type=int, default=200)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="ft-replicated-"))
    group = services.SentinelGroup(workdir)
    try:
        plain = measure(group, workdir, 0, args)
        replicated = measure(group, workdir, 1, args)
    finally:
        group.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"p50 submit latency: primary only {plain[0]:.3f} ms, every replica {replicated[0]:.3f} ms "
          f"-> {replicated[0] / plain[0]:.2f}x (+{replicated[0] - plain[0]:.3f} ms)")
    print(f"throughput, {args.concurrency} concurrent clients: primary only {plain[1]:.0f}/s, every replica "
          f"{replicated[1]:.0f}/s -> {replicated[1] / plain[1]:.2f}x")


if __name__ == "__main__":
    main()
