"""Aggregation kernel throughput against memcpy of the same bytes, measured in one run.

    python bench/aggregation_kernel.py [--updates 16] [--repeats 5]

Both sides walk the same parsed safetensors views tensor by tensor: memcpy copies each into a
preallocated buffer, the kernel does the weighted accumulate FedAvg needs (acc += w * clip * x).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fleettune.shared.protocol.adapter_spec import LAYOUTS, AdapterConfig, build_spec
from fleettune.shared.strategies.fedavg import StreamingFedAvg
from fleettune.shared.protocol.safetensors_reader import parse
from fleettune.shared.protocol.updates import encode_update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)

    spec = build_spec(LAYOUTS["llama-1b"], AdapterConfig(rank=8))
    rng = np.random.default_rng(0)
    blobs = [encode_update({k: rng.standard_normal(s, dtype=np.float32) for k, s in spec.tensors.items()})
             for _ in range(args.updates)]
    updates = [parse(b, spec.tensors, 1 << 20) for b in blobs]
    nbytes = sum(t.numel() * 4 for u in updates for t in u.values())

    buffers = {k: torch.empty(s) for k, s in spec.tensors.items()}

    def memcpy() -> None:
        for u in updates:
            for k, t in u.items():
                buffers[k].copy_(t)

    def kernel() -> None:
        avg = StreamingFedAvg(spec.tensors)
        for i, u in enumerate(updates):
            avg.add(u, weight=float(10 + i), scale=0.5)

    best = {}
    for name, fn in (("memcpy", memcpy), ("fedavg", kernel)):
        fn()  # warm up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        best[name] = min(times)
    gbs = {k: nbytes / v / 1e9 for k, v in best.items()}
    print(f"layout llama-1b r=8 q/k/v/o: {spec.num_parameters:,} parameters, {args.updates} updates, "
          f"{nbytes / 1e6:.0f} MB per pass, best of {args.repeats}")
    print(f"memcpy  {gbs['memcpy']:6.2f} GB/s")
    print(f"fedavg  {gbs['fedavg']:6.2f} GB/s")
    print(f"ratio fedavg/memcpy = {gbs['fedavg'] / gbs['memcpy']:.2f} (goal >= 0.50)")


if __name__ == "__main__":
    main()
