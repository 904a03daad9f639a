"""What secure aggregation costs: SecAgg+ rounds against plain rounds and Flower's SecAgg+ primitives.

    python bench/secagg.py [--sizes 100 1000] [--dim 32768] [--dropout 0.05] \\
        [--flower-python .venv-flower/bin/python]      # pip install flwr==1.42.0 there, apart

For each cohort size n, one whole round of fleettune's SecAgg+ (shared.secagg.simulation: the device
and server functions the pipeline runs, all in this process, a `--dropout` share of the devices
vanishing after sharing their keys) on updates of `--dim` values (32,768: the tiny model's rank-8
LoRA), and the same round plain (a float32 safetensors update per device, parsed and folded by the
server). Printed per device: CPU ms, bytes up and down, requests; for the server: CPU s; and the
round's wall time in this one process (every device's work plus the server's, serially).

Flower (1.42) ships SecAgg+ primitives, not a comparable round on these cores; its column times
the same work per device with them (2 SECP384R1 key pairs, k ECDH agreements for the share keys and
k for the masks, Shamir t-of-k of the seed and the key, k Fernet encryptions, k + 1 MT19937 masks)
on a sample of devices, and the server's unmasking (a Shamir combine and a mask per survivor, timed
on the same sample and multiplied by n: its combine alone is seconds per device at t = 157). `flwr` pins older
FastAPI and Starlette than the API uses, so it lives in its own virtualenv (as for vs_flower.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import torch

from fleettune.shared.protocol.compression import read_update
from fleettune.shared.protocol.updates import encode_update
from fleettune.shared.secagg import fixed_point, simulation
from fleettune.shared.secagg import primitives as crypto
from fleettune.shared.strategies.fedavg import StreamingFedAvg

REQUESTS_SECURE = 8  # advertise, share, masked-url, PUT, masked, consistency, unmask, and a stage poll at least
REQUESTS_PLAIN = 3  # upload-url, PUT, submit (the check-in is the same in both)

FLOWER = r'''
import json, sys, time, numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.secure_aggregation.crypto.shamir import create_shares, combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
n, k, t, d, sample = map(int, sys.argv[1:6])
keys = [ec.generate_private_key(ec.SECP384R1()) for _ in range(k + 1)]
def device():
    sk1, sk2 = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    seed = bytes(32)
    shares_sk = create_shares(b"x" * 48, t, k)
    shares_seed = create_shares(seed, t, k)
    for j in range(k):
        key = generate_shared_key(sk1, keys[j].public_key())
        encrypt(key, shares_sk[j] + shares_seed[j])
    masked = np.zeros(d, np.int64)
    masked += pseudo_rand_gen(seed, 1 << 32, [(d,)])[0]
    for j in range(k):
        masked += pseudo_rand_gen(generate_shared_key(sk2, keys[j].public_key())[:32], 1 << 32, [(d,)])[0]
    return shares_seed
t0 = time.process_time()
for _ in range(sample):
    shares = device()
device_ms = (time.process_time() - t0) / sample * 1e3
t0 = time.process_time()
for _ in range(sample):  # the server: one combine and one mask per survivor (timed on a sample)
    combine_shares(shares[:t])
    pseudo_rand_gen(bytes(32), 1 << 32, [(d,)])
print(json.dumps({"device_ms": device_ms, "server_s": (time.process_time() - t0) / sample * n}))
'''


def secure_round(n: int, dim: int, dropout: float, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = {f"dev-{i:05d}": crypto.identity_key() for i in range(n)}
    updates = {}
    for d in ids:
        x = rng.normal(size=dim)
        updates[d] = x * (0.9 / np.linalg.norm(x))
    weights = {d: int(rng.integers(1, 65)) for d in ids}
    gone = set(sorted(ids)[:int(n * dropout)])
    encoding = fixed_point.choose(n, 1.0, 64)
    started = time.perf_counter()
    res = simulation.run(updates, weights, encoding, ids, drops=lambda a, s: gone if s == "masked" else set(),
                         rng=rng)
    wall = time.perf_counter() - started
    survivors = res.survivors
    exact = sum(weights[d] * updates[d] for d in survivors) / sum(weights[d] for d in survivors)
    return {"n": n, "k": res.degree, "t": res.threshold, "bits": encoding.bits, "dropped": len(gone),
            "device_ms": 1e3 * float(np.mean(list(res.device_seconds.values()))),
            "up": float(np.mean(list(res.bytes_up.values()))), "down": float(np.mean(list(res.bytes_down.values()))),
            "server_s": res.server_seconds, "wall_s": wall,
            "error": float(np.abs(res.mean - exact).max()), "bound": res.bound}


def plain_round(n: int, dim: int, seed: int = 0) -> dict:
    """The same round in the clear: each device encodes a float32 update; the server parses and folds it."""
    rng = np.random.default_rng(seed)
    layout = {"delta": (dim,)}
    device_s = server_s = 0.0
    size = 0
    acc = StreamingFedAvg(layout)
    started = time.perf_counter()
    for _ in range(n):
        t0 = time.process_time()
        blob = encode_update({"delta": rng.normal(size=dim).astype(np.float32)})
        device_s += time.process_time() - t0
        size = len(blob)
        t0 = time.process_time()
        tensors, _ = read_update(blob, layout, 1 << 20)
        acc.add(tensors, float(rng.integers(1, 65)))
        server_s += time.process_time() - t0
    acc.mean()
    return {"device_ms": 1e3 * device_s / n, "up": size, "server_s": server_s, "wall_s": time.perf_counter() - started}


def flower(python: str, n: int, k: int, t: int, dim: int, sample: int) -> dict | None:
    if not python:
        return None
    done = subprocess.run([python, "-c", FLOWER, str(n), str(k), str(t), str(dim), str(sample)],
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        print(f"flower primitives failed: {done.stderr[-500:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--dim", type=int, default=32768)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--flower-python", default="")
    parser.add_argument("--flower-sample", type=int, default=5, help="devices whose Flower work is timed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for n in args.sizes:
        sec = secure_round(n, args.dim, args.dropout)
        plain = plain_round(n, args.dim)
        flw = flower(args.flower_python, n, sec["k"], sec["t"], args.dim, args.flower_sample)
        print(f"n={n} k={sec['k']} t={sec['t']} mod 2^{sec['bits']} dim={args.dim} dropped {sec['dropped']} "
              f"after sharing; |mean - exact| {sec['error']:.2e} (bound {sec['bound']:.2e})")
        print(f"  per device: secure {sec['device_ms']:.1f} ms CPU, {sec['up'] / 1e3:.1f} kB up, "
              f"{sec['down'] / 1e3:.1f} kB down, {REQUESTS_SECURE} requests | plain {plain['device_ms']:.2f} ms, "
              f"{plain['up'] / 1e3:.1f} kB up, {REQUESTS_PLAIN} requests"
              + (f" | Flower primitives {flw['device_ms']:.1f} ms" if flw else ""))
        print(f"  server: secure {sec['server_s']:.2f} s CPU | plain {plain['server_s']:.3f} s"
              + (f" | Flower primitives, unmasking only: {flw['server_s']:.2f} s (n x a sample's mean)" if flw else ""))
        print(f"  round wall time in one process: secure {sec['wall_s']:.1f} s | plain {plain['wall_s']:.2f} s")
        print(f"secagg n={n}: device CPU secure/plain = {sec['device_ms'] / plain['device_ms']:.0f}x, "
              f"bytes up secure/plain = {sec['up'] / plain['up']:.2f}x"
              + (f", device CPU Flower/fleettune = {flw['device_ms'] / sec['device_ms']:.2f}x" if flw else ""),
              flush=True)


if __name__ == "__main__":
    main()
