"""Aggregator peak RSS at N = 10, 100 and 1,000 updates of the 1B-class layout (goal: flat).

    python bench/aggregator_rss.py [--sizes 10 100 1000]

Each N runs in a fresh process: N accepted updates are recorded (fakeredis state, local-directory
store; 10 distinct objects hard-linked under N keys, so the disk holds 10), then the peak RSS is
reset (/proc/self/clear_refs) and the real close - read, verify, stream-average, publish - runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(n: int) -> dict:
    import fakeredis
    import numpy as np
    import torch

    from fleettune.shared import keys
    from fleettune.shared.protocol.adapter_spec import LAYOUTS
    from fleettune.shared.federation import FederationConfig, RoundPolicy
    from fleettune.shared.pipeline.rounds import RoundCoordinator
    from fleettune.shared.settings import Settings
    from fleettune.shared.state import FederationState, UpdateRecord
    from fleettune.shared.storage import LocalObjectStore
    from fleettune.shared.protocol.updates import encode_update

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="ft-rss-"))
    store, state = LocalObjectStore(root), FederationState(fakeredis.FakeRedis())
    devices = [f"d{i:05d}" for i in range(n)]
    config = FederationConfig("bench", LAYOUTS["llama-1b"], policy=RoundPolicy(min_updates=1, max_rounds=1))
    coordinator = RoundCoordinator(state, store, Settings(), clock=time.time)
    coordinator.start(config, devices)
    rng = np.random.default_rng(0)
    distinct = []
    for j in range(10):
        blob = encode_update({k: rng.standard_normal(s, dtype=np.float32) * 1e-3 for k, s in config.spec.tensors.items()})
        path = root / f"distinct-{j}"
        path.write_bytes(blob)
        distinct.append((path, hashlib.sha256(blob).hexdigest()))
    for i, device in enumerate(devices):
        path, sha = distinct[i % 10]
        key = keys.update_object("bench", 1, device)
        target = root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
        state.accounting.accept(f"m{i}", "bench", 1, UpdateRecord(device, key, sha, 10, 10, 1.0, 1.0, 0.0, {}, 0.0))

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM, the peak RSS
    before = _kib("VmRSS")
    start = time.perf_counter()
    result = coordinator.close("bench", 1)
    seconds = time.perf_counter() - start
    assert result.version == 1 and len(result.manifest["contributors"]) == n
    return {"n": n, "rss_before_mib": before / 1024, "peak_mib": _kib("VmHWM") / 1024, "seconds": seconds,
            "update_mb": os.path.getsize(distinct[0][0]) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    rows = []
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--child", str(n)], check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'N':>6} {'update MB':>9} {'RSS before close':>16} {'peak RSS in close':>17} {'close s':>8} {'GB/s':>6}")
    for r in rows:
        print(f"{r['n']:>6} {r['update_mb']:>9.1f} {r['rss_before_mib']:>12.0f} MiB {r['peak_mib']:>13.0f} MiB "
              f"{r['seconds']:>8.2f} {r['n'] * r['update_mb'] / 1e3 / r['seconds']:>6.2f}")
    print(f"peak ratio N={rows[-1]['n']} / N={rows[0]['n']}: {rows[-1]['peak_mib'] / rows[0]['peak_mib']:.2f} (goal: flat, ~1.0)")


if __name__ == "__main__":
    main()
