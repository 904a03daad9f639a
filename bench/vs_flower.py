"""Flower's aggregate() against fleettune's close path, from serialized updates to the mean.

    python -m venv .venv-flower && .venv-flower/bin/pip install flwr==1.42.0   # the peer, apart
    python bench/vs_flower.py [--sizes 32 1000] [--flower-python .venv-flower/bin/python]

Both sides start from N serialized updates of the 1B-class layout (rank-8 LoRA on q/k/v/o of 16
layers, 6.8 MB each) already in memory, as a server holds what it received, and end with the
weighted mean. Each side runs in a fresh process so its peak RSS (VmHWM) is its own.
  - Flower 1.42: `parameters_to_ndarrays` of each client's Parameters, then
    `flwr.server.strategy.aggregate.aggregate` over (ndarrays, num_examples), as FedAvg does.
  - fleettune: what ingest does per update (sha256, strict parse, norm, clip, fold into the
    process's partial sum) and what the close does (encode and decode the partial, reduce, mean).
`flwr` pins older FastAPI and Starlette than the API uses, so it lives in its own virtualenv and
is never a dependency of fleettune. The N inputs share 8 distinct byte strings, so neither side's
peak counts N copies of its input.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DISTINCT = 8


def _hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise KeyError("VmHWM")


def _reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _arrays(shapes: dict[str, list[int]], seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s, dtype=np.float32) * 1e-3 for k, s in sorted(shapes.items())}


def flower_side(n: int, shapes: dict[str, list[int]]) -> dict:
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy.aggregate import aggregate

    distinct = [ndarrays_to_parameters(list(_arrays(shapes, i).values())) for i in range(DISTINCT)]
    inputs = [(distinct[i % DISTINCT], 10 + i % 50) for i in range(n)]
    nbytes = sum(len(t) for t in distinct[0].tensors)
    _reset_hwm()
    base = _hwm_mib()
    started = time.perf_counter()
    mean = aggregate([(parameters_to_ndarrays(p), k) for p, k in inputs])
    seconds = time.perf_counter() - started
    assert len(mean) == len(shapes)
    return {"seconds": seconds, "peak_mib": _hwm_mib() - base, "bytes": nbytes}


def fleettune_side(n: int, shapes: dict[str, list[int]]) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    from fleettune.shared.strategies.fedavg import clip_scale, update_norm
    from fleettune.shared.protocol.safetensors_reader import parse
    from fleettune.shared.strategies.combine import RoundAggregator, padded
    from fleettune.shared.strategies.config import AggregationConfig
    from fleettune.shared.strategies.partial import PartialSum
    from fleettune.shared.protocol.updates import encode_update

    torch.set_num_threads(1)
    layout = {k: tuple(s) for k, s in shapes.items()}
    distinct = [encode_update(_arrays(shapes, i)) for i in range(DISTINCT)]
    digests = [hashlib.sha256(b).hexdigest() for b in distinct]
    base = {k: torch.zeros(s) for k, s in layout.items()}
    _reset_hwm()
    start_hwm = _hwm_mib()
    started = time.perf_counter()
    partial = PartialSum(layout)
    for i in range(n):  # ingest: verify, parse, norm, clip, fold
        blob = distinct[i % DISTINCT]
        assert hashlib.sha256(blob).hexdigest() == digests[i % DISTINCT]
        update = parse(blob, layout, 1 << 20)
        partial.add(padded(update, layout), 10 + i % 50, clip_scale(update_norm(update), 1e6))
    # close: the partial goes through the store's bytes, then reduce and mean
    back = PartialSum.decode(partial.encode(), layout, partial.metadata(), 1 << 20)
    aggregator = RoundAggregator(AggregationConfig(), base, layout, 8)
    aggregator.add_sum(back.sum, back.weight, back.count)
    aggregator.finish(1.0, {})
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_mib": _hwm_mib() - start_hwm, "bytes": len(distinct[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[32, 1000])
    parser.add_argument("--flower-python", default=str(ROOT / ".venv-flower/bin/python"))
    parser.add_argument("--side", choices=["flower", "fleettune"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        shapes = json.loads(sys.stdin.read())
        result = (flower_side if args.side == "flower" else fleettune_side)(args.n, shapes)
        print(json.dumps(result))
        return

    sys.path.insert(0, str(ROOT))
    from fleettune.shared.protocol.adapter_spec import LAYOUTS, AdapterConfig, build_spec

    spec = build_spec(LAYOUTS["llama-1b"], AdapterConfig(rank=8))
    shapes = json.dumps({k: list(s) for k, s in spec.tensors.items()})
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    for n in args.sizes:
        row = {}
        for side, python in (("fleettune", sys.executable), ("flower", args.flower_python)):
            out = subprocess.run([python, __file__, "--side", side, "--n", str(n)], input=shapes, env=env,
                                 capture_output=True, text=True, check=True)
            row[side] = json.loads(out.stdout.strip().splitlines()[-1])
        ours, theirs = row["fleettune"], row["flower"]
        gb = n * ours["bytes"] / 1e9
        print(f"N={n:5d} ({gb:.1f} GB): fleettune {gb / ours['seconds']:5.2f} GB/s, peak +{ours['peak_mib']:7.0f} MiB | "
              f"Flower aggregate() {n * theirs['bytes'] / 1e9 / theirs['seconds']:5.2f} GB/s, peak "
              f"+{theirs['peak_mib']:7.0f} MiB | Flower / fleettune: time {theirs['seconds'] / ours['seconds']:.2f}x, "
              f"peak memory {theirs['peak_mib'] / max(ours['peak_mib'], 1):.1f}x", flush=True)


if __name__ == "__main__":
    main()
