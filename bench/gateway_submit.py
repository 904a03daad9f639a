"""The gateway's submit path (HTTP, auth, rate limit, ledger, enqueue) against a direct Redis enqueue.

    python bench/gateway_submit.py [--submits 3000] [--concurrency 32] [--workers 1]

Starts its own redis-server (S3 is not on the submit path) and one `fleettune api` process
(uvicorn, one process). In one run it measures:
  - latency, one request at a time: p50 of a direct Celery enqueue to Redis (what devices did
    before the gateway) and of POST /updates through a real HTTP client; the difference is what
    the gateway adds;
  - throughput of one API process under `--concurrency` concurrent clients (aiohttp), and the API
    process's CPU time per submit (from /proc), which shows whether the API or the client is the limit.
Goals (issue 7): >= 500 submits/s per API process, <= 2 ms added to p50.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleettune.shared.control.auth import Tokens  # noqa: E402
from fleettune.shared.protocol.envelope import Envelope  # noqa: E402
from fleettune.shared.runtime import Runtime  # noqa: E402
from fleettune import Federation  # noqa: E402
from fleettune.shared.settings import Settings  # noqa: E402
from fleettune.workers.local import services  # noqa: E402
from fleettune.workers.worker.app import enqueuer, make_app  # noqa: E402


def body(i: int) -> dict:
    return {"round": 1, "sha256": hashlib.sha256(str(i).encode()).hexdigest(), "num_samples": 10, "base_version": 0,
            "train_seconds": 1.0, "metrics": {"loss": 2.0}}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process and its live children have used (Linux /proc): with
    `--workers N` uvicorn's processes are children of the one started."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            children += [int(c) for c in f.read().split()]
    return own + sum(cpu_seconds(child) for child in children)


def p50_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


async def flood(url: str, tokens: list[str], fed: str, total: int, concurrency: int) -> float:
    """Submits per second with `concurrency` requests in flight, each device submitting its own.

    aiohttp's client: on these 2 cores the load generator shares the machine with the API
    process, and httpx's async client spent more CPU per request than the API it measured.
    """
    counter = iter(range(total))
    errors = 0
    headers = [{"Authorization": f"Bearer {token}"} for token in tokens]

    async def worker(http: aiohttp.ClientSession) -> None:
        nonlocal errors
        for i in counter:
            async with http.post(f"/api/v1/federations/{fed}/updates", json=body(10**6 + i),
                                 headers=headers[i % len(headers)]) as response:
                await response.read()
                errors += response.status != 202

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector) as http:
        started = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{errors} submits were not accepted")
    return total / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submits", type=int, default=3000)
    parser.add_argument("--latency-samples", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--workers", type=int, default=1, help="API processes (fleettune api --workers)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="ft-gateway-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)  # the S3 data can be gigabytes
    with services.redis_server(workdir) as redis_url:
        env = services.service_env(redis_url, "unused:1", bucket="bench", FLEETTUNE_DEVICE_RATE_LIMIT="1000000")
        env.pop("FLEETTUNE_S3_ENDPOINT")  # the API presigns for the local store; submits never touch it
        env["FLEETTUNE_DATA_DIR"] = str(workdir / "data")
        settings = Settings.from_env(env)
        runtime = Runtime.from_settings(settings)
        api = services.Api(env, workdir, args=("--workers", str(args.workers)))
        try:
            admin = Tokens(runtime.redis).create_api_key("admin", "bench")[1]
            federation = Federation(admin, "bench", api.url)
            federation.create(model="tiny-llama")
            tokens = [federation.register_device(f"d{i:04d}") for i in range(args.devices)]

            enqueue = enqueuer(make_app(settings))
            direct = []
            for i in range(args.latency_samples):
                raw = Envelope("bench", 1, "d0000", "updates/bench/000001/d0000.safetensors",
                               body(i)["sha256"], 10, 0).encode()
                started = time.perf_counter()
                enqueue(raw, time.time())
                direct.append(time.perf_counter() - started)

            gateway = []
            with httpx.Client(base_url=api.url, timeout=30) as http:
                for i in range(args.latency_samples):
                    headers = {"Authorization": f"Bearer {tokens[i % len(tokens)]}"}
                    started = time.perf_counter()
                    response = http.post("/api/v1/federations/bench/updates", json=body(i), headers=headers)
                    gateway.append(time.perf_counter() - started)
                    assert response.status_code == 202, response.text

            cpu0, wall0 = cpu_seconds(api.proc.pid), time.perf_counter()
            rate = asyncio.run(flood(api.url, tokens, "bench", args.submits, args.concurrency))
            api_cpu = (cpu_seconds(api.proc.pid) - cpu0) / args.submits
            api_busy = (cpu_seconds(api.proc.pid) - cpu0) / (time.perf_counter() - wall0)
        finally:
            api.stop()
    added = p50_ms(gateway) - p50_ms(direct)
    print(f"p50 latency: direct enqueue {p50_ms(direct):.3f} ms, gateway submit {p50_ms(gateway):.3f} ms "
          f"-> added {added:.3f} ms (goal <= 2)")
    print(f"throughput of {args.workers} API process(es), {args.concurrency} concurrent clients: {rate:.0f} "
          f"submits/s (goal >= 500 per process): {rate / 500:.2f}x the goal")
    print(f"API CPU per submit {1000 * api_cpu:.3f} ms (goal <= 0.7), busy {100 * api_busy:.0f}% of one core "
          f"during the flood")


if __name__ == "__main__":
    main()
