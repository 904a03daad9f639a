"""10,000 updates in one round through the real pipeline, then retention.

    python bench/round_10k.py [--devices 10000] [--concurrency 16]

Starts redis-server, SeaweedFS (`weed mini`), `fleettune api` and two `fleettune worker`
processes of one pool process each (one also runs the beat, whose sweep applies retention), then
runs `fleettune simulate --rounds 1`: it registers the devices through the API, and each device
checks in, uploads its update by its presigned URL and submits through the gateway. Reports:
updates/s from the first accepted update to the version published; peak RSS of every worker
process; Redis memory before, after the round and after retention; the store's bytes (objects
listed in the bucket) and SeaweedFS's disk before, after the round and after retention (with a
vacuum, which is how SeaweedFS gives deleted space back).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleettune.shared import keys  # noqa: E402
from fleettune.shared.control.auth import Tokens  # noqa: E402
from fleettune.shared.runtime import Runtime  # noqa: E402
from fleettune.shared.settings import Settings  # noqa: E402
from fleettune.workers.local import services  # noqa: E402

RETENTION_S = 20


def tree_hwm_mib(pid: int) -> dict[int, float]:
    """VmHWM of a process and its children."""
    out = {}
    pids = [pid] + [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out[p] = int(line.split()[1]) / 1024
    return out


def disk_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def bucket_mib(runtime: Runtime) -> float:
    client, bucket = runtime.store.client, runtime.store.bucket
    return sum(o.size or 0 for o in client.list_objects(bucket, recursive=True)) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="ft-10k-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)  # the S3 data can be gigabytes
    with services.redis_server(workdir) as redis_url:
        weed = services.Weed(workdir)
        env = services.service_env(redis_url, weed.endpoint, bucket="bench", FLEETTUNE_TASK_TIME_LIMIT="60",
                                   FLEETTUNE_VISIBILITY_TIMEOUT="120", FLEETTUNE_RETENTION=str(RETENTION_S),
                                   FLEETTUNE_DEVICE_RATE_LIMIT="1000")
        settings = Settings.from_env(env)
        runtime = Runtime.from_settings(settings)
        api = services.Api(env, workdir)
        workers = [services.Worker("w0", env, workdir, concurrency=1, beat=True, via_cli=True),
                   services.Worker("w1", env, workdir, concurrency=1, via_cli=True)]
        key = Tokens(runtime.redis).create_api_key("admin", "bench")[1]
        redis_before = runtime.redis.info("memory")["used_memory"] / 2**20
        disk_before, bucket_before = disk_mib(weed.data), bucket_mib(runtime)

        first_accept, closed_at = [], []

        def watch() -> None:  # when the first update is accepted and when the version is published
            while not closed_at:
                stats = runtime.state.federations.stats("big") if runtime.redis.sismember(keys.FEDERATIONS, "big") else {}
                if stats.get("accepted") and not first_accept:
                    first_accept.append(time.perf_counter())
                info = runtime.state.rounds.round_info("big", 1) if stats else None
                if info is not None and info.status in ("closed", "failed"):
                    closed_at.append(time.perf_counter())
                time.sleep(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        started = time.perf_counter()
        fleettune = str(Path(sys.executable).parent / "fleettune")
        subprocess.run([fleettune, "simulate", "--federation", "big", "--devices", str(args.devices),
                        "--rounds", "1", "--concurrency", str(args.concurrency), "--url", api.url,
                        "--api-key", key, "--min-updates", "2", "--timeout", "3600"],
                       env=dict(os.environ, **env), check=True)
        watcher.join(timeout=600)
        total_s = time.perf_counter() - started
        info = runtime.state.rounds.round_info("big", 1)
        stats = runtime.state.federations.stats("big")
        hwm = {w.name: tree_hwm_mib(w.proc.pid) for w in workers}
        redis_round = runtime.redis.info("memory")["used_memory"] / 2**20
        disk_round, bucket_round = disk_mib(weed.data), bucket_mib(runtime)
        manifest = json.loads(runtime.store.get(f"{keys.version_prefix('big', 1)}/manifest.json"))

        deadline = time.monotonic() + RETENTION_S + 120
        while runtime.redis.zcard(keys.RETENTION) and time.monotonic() < deadline:
            time.sleep(1)
        pruned = not runtime.redis.zcard(keys.RETENTION)
        urllib.request.urlopen(f"http://127.0.0.1:{weed.ports['master']}/vol/vacuum?garbageThreshold=0.0001",
                               timeout=120).read()
        redis_after = runtime.redis.info("memory")["used_memory"] / 2**20
        disk_after, bucket_after = disk_mib(weed.data), bucket_mib(runtime)
        for w in workers:
            w.stop()
        api.stop()
        weed.stop()

    n = stats.get("accepted", 0)
    rate = n / (closed_at[0] - first_accept[0])
    print(f"round 1: {info.status} -> version {info.version}; {n} accepted of {args.devices}, "
          f"{stats.get('rejected', 0)} rejected; {manifest['aggregation'].get('partials')} partials, "
          f"{manifest['aggregation'].get('read_at_close')} updates read at close")
    print(f"updates/s, first accepted -> version published: {rate:.0f} ({total_s:.0f} s for the whole "
          f"simulate, device registration included)")
    for name, procs in hwm.items():
        print(f"peak RSS {name}: " + ", ".join(f"{v:.0f} MiB" for v in procs.values())
              + " (the worker's main process, then its children: beat if any, the pool process)")
    print(f"Redis used_memory: {redis_before:.1f} MiB before, {redis_round:.1f} after the round "
          f"({(redis_round - redis_before) * 2**20 / max(n, 1):.0f} B per update), {redis_after:.1f} after retention")
    print(f"store (bucket objects): {bucket_before:.1f} MiB before, {bucket_round:.1f} after the round, "
          f"{bucket_after:.1f} after retention{'' if pruned else ' (retention did not run in time)'}")
    print(f"SeaweedFS disk: {disk_before:.1f} MiB before, {disk_round:.1f} after the round, {disk_after:.1f} after "
          f"retention and a vacuum")


if __name__ == "__main__":
    main()
