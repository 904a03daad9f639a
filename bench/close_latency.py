"""Close latency after the last update, against one adapter write, at growing N (goal: <= 3x, flat in N).

    python bench/close_latency.py [--tiny 100 1000 10000] [--large 100 1000]

Starts its own redis-server and SeaweedFS (`weed mini`). For each N: N update objects are
uploaded, then ingested by the production Ingestor in this process, alternating between two
PartialFolders as two worker processes would (each folds what it accepts and commits partial
sums). The last ingest makes the round ready; the close is timed from then to the version
published and the next round open. Two rounds per N: the first has no provisional weight cap
(updates claiming more than the final cap are read again), the second folds against the first's. "One adapter write" is `versions.publish` of one version of
the same layout (adapter, config, manifest, pointer) to the same store, the median of 5. The
streaming close's read of every update (what it costs without partials) is timed on the same
round afterwards.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleettune.shared import keys, versions  # noqa: E402
from fleettune.shared.protocol.adapter_spec import LAYOUTS, initial_weights  # noqa: E402
from fleettune.shared.protocol.envelope import Envelope  # noqa: E402
from fleettune.shared.federation import FederationConfig, RoundPolicy  # noqa: E402
from fleettune.shared.pipeline.folding import PartialFolder  # noqa: E402
from fleettune.shared.pipeline.ingest import Ingestor  # noqa: E402
from fleettune.shared.pipeline.round_inputs import RoundReader  # noqa: E402
from fleettune.shared.runtime import Runtime  # noqa: E402
from fleettune.shared.settings import Settings  # noqa: E402
from fleettune.shared.strategies.combine import RoundAggregator  # noqa: E402
from fleettune.shared.protocol.updates import encode_update  # noqa: E402
from fleettune.workers.local import services  # noqa: E402


def one_write_seconds(runtime: Runtime, config: FederationConfig) -> float:
    weights = initial_weights(config.spec, 1)
    times = []
    for i in range(5):
        started = time.perf_counter()
        versions.publish(runtime.store, f"write-{config.name}", i, weights, config.spec, {"round": i})
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def ingest_round(runtime: Runtime, settings: Settings, config: FederationConfig, round_no: int,
                 devices: list[str], distinct: list[bytes], rng) -> float:
    """Upload and ingest one round's updates (two folders, as two processes); returns updates/s."""
    name = config.name
    base = runtime.state.rounds.round_info(name, round_no).base_version
    envelopes = []
    for i, device in enumerate(devices):
        blob, key = distinct[i % len(distinct)], keys.update_object(name, round_no, device)
        runtime.store.put(key, blob)
        envelopes.append(Envelope(name, round_no, device, key, hashlib.sha256(blob).hexdigest(),
                                  int(rng.integers(10, 500)), base).encode())
    folders = [PartialFolder(runtime.state, runtime.store, settings.fold_batch, settings.fold_tail, 3600)
               for _ in range(2)]
    ingestors = [Ingestor(runtime.state, runtime.store, settings, folder=f) for f in folders]
    started = time.perf_counter()
    for i, raw in enumerate(envelopes):
        result = ingestors[i % 2].ingest(raw)
        assert result.outcome == "accepted", result
    assert result.round_ready
    return len(envelopes) / (time.perf_counter() - started)


def measure(runtime: Runtime, settings: Settings, layout: str, n: int) -> list[dict]:
    """Two rounds: the first has no provisional weight cap yet, the second folds against the first's."""
    name = f"close-{layout}-{n}"
    devices = [f"d{i:05d}" for i in range(n)]
    config = FederationConfig(name, LAYOUTS[layout], policy=RoundPolicy(min_updates=1, max_rounds=2,
                                                                        timeout_seconds=36000))
    runtime.coordinator.start(config, devices)
    rng = np.random.default_rng(0)
    distinct = [encode_update({k: rng.standard_normal(s, dtype=np.float32) * 1e-3
                               for k, s in config.spec.tensors.items()}) for _ in range(8)]
    write_s = one_write_seconds(runtime, config)
    rows = []
    for round_no in (1, 2):
        ingest_rate = ingest_round(runtime, settings, config, round_no, devices, distinct, rng)
        started = time.perf_counter()
        closed = runtime.coordinator.close(name, round_no)
        close_s = time.perf_counter() - started
        assert closed.decision == "closed", closed
        base = versions.load_weights(runtime.store, name, round_no - 1, config.spec, settings.max_update_bytes,
                                     settings.max_header_bytes)
        started = time.perf_counter()
        RoundReader(runtime.state, runtime.store, settings).stream(
            config, runtime.state.rounds.round_info(name, round_no),
            RoundAggregator(config.aggregation, base, config.update_tensors, config.adapter.rank,
                            config.adapter.alpha))
        stream_s = time.perf_counter() - started
        runtime.store.delete_prefix(keys.round_updates_prefix(name, round_no))  # bound the disk between sizes
        fields = closed.manifest["aggregation"]
        rows.append({"layout": layout, "n": n, "round": round_no, "close_s": close_s, "write_s": write_s,
                     "stream_s": stream_s, "partials": fields["partials"], "read_at_close": fields["read_at_close"],
                     "ingest_per_s": ingest_rate, "mb": len(distinct[0]) / 1e6})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", type=int, nargs="*", default=[100, 1000, 10000])
    parser.add_argument("--large", type=int, nargs="*", default=[100, 1000])
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="ft-close-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)  # the S3 data can be gigabytes
    rows = []
    with services.redis_server(workdir) as redis_url, services.s3_server(workdir) as s3:
        settings = Settings.from_env(services.service_env(redis_url, s3, bucket="bench"))
        runtime = Runtime.from_settings(settings)
        for layout, sizes in (("tiny-llama", args.tiny), ("llama-1b", args.large)):
            for n in sizes:
                for row in measure(runtime, settings, layout, n):
                    rows.append(row)
                    print(f"{layout:10s} N={n:6d} round {row['round']} ({row['mb']:.2f} MB each): close "
                          f"{row['close_s'] * 1e3:7.1f} ms = {row['close_s'] / row['write_s']:5.2f}x one adapter write "
                          f"({row['write_s'] * 1e3:.1f} ms); {row['partials']} partials, {row['read_at_close']} "
                          f"updates read at close; reading every update instead: {row['stream_s'] * 1e3:8.1f} ms "
                          f"({row['stream_s'] / row['close_s']:.0f}x); ingest {row['ingest_per_s']:.0f}/s", flush=True)
    for layout in ("tiny-llama", "llama-1b"):
        for round_no in (1, 2):
            got = [r for r in rows if r["layout"] == layout and r["round"] == round_no]
            if got:
                print(f"{layout} round {round_no}: close / one adapter write "
                      + ", ".join(f"N={r['n']}: {r['close_s'] / r['write_s']:.2f}x" for r in got)
                      + " (goal <= 3x, flat in N)")

if __name__ == "__main__":
    main()
