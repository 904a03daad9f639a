"""A long fuzzing run of the strict safetensors reader, the compressed-update reader and the envelope decoder.

    python bench/fuzz.py [--inputs 1000000] [--seed 0]

Inputs: random bytes, valid files for a small adapter spec with random bytes, flipped bits and
cut or stretched tails, compressed updates of every encoding mutated the same way, and msgpack
maps of random fields. Every input must end in a result or a
named rejection; anything else (an exception, a crash) is reported with the input's index.
Prints the count per outcome and the rate.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import msgpack
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleettune.shared.protocol.compression import ENCODINGS, encode  # noqa: E402
from fleettune.shared.protocol.fuzz_targets import (SPEC, coded_outcome, container, envelope_outcome,  # noqa: E402
                                                    reader_outcome)

FIELDS = ["v", "federation", "round", "device", "object_key", "sha256", "num_samples", "base_version",
          "train_seconds", "metrics", "extra"]


def valid_file(rng: np.random.Generator) -> bytes:
    header, offset, data = {}, 0, b""
    for name, shape in SPEC.items():
        dtype, size = [("F32", 4), ("F16", 2), ("BF16", 2)][rng.integers(3)]
        n = size * shape[0] * shape[1]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        data += rng.bytes(n)
        offset += n
    return container(header, data)


def mutate(buf: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(buf)
    for _ in range(rng.integers(1, 4)):
        kind = rng.integers(3)
        if kind == 0 and b:
            i = int(rng.integers(len(b)))
            b[i] ^= 1 << int(rng.integers(8))
        elif kind == 1:
            del b[int(rng.integers(len(b) + 1)):]
        else:
            b += rng.bytes(int(rng.integers(1, 16)))
    return bytes(b)


def envelope(rng: np.random.Generator) -> bytes:
    values = [None, True, 1, -1, 2**53, 1.5, float("nan"), "x" * int(rng.integers(0, 80)), b"\0", [1], {"loss": 1.0}]
    body = {FIELDS[i]: values[rng.integers(len(values))] for i in rng.choice(len(FIELDS), rng.integers(0, 11), False)}
    raw = msgpack.packb(body, use_bin_type=True)
    return mutate(raw, rng) if rng.integers(4) == 0 else raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    outcomes: collections.Counter = collections.Counter()
    started = time.perf_counter()
    for i in range(args.inputs):
        kind = i % 5
        try:
            if kind == 0:
                outcomes["reader " + reader_outcome(rng.bytes(int(rng.integers(0, 200))))] += 1
            elif kind == 1:
                buf = valid_file(rng)
                outcomes["reader " + reader_outcome(mutate(buf, rng) if rng.integers(2) else buf)] += 1
            elif kind == 4:  # a compressed update of a random encoding, mutated half the time
                arrays = {k: rng.normal(0, 1, s).astype(np.float32) for k, s in SPEC.items()}
                buf = encode(arrays, ENCODINGS[rng.integers(len(ENCODINGS))], rng, float(rng.uniform(0.05, 0.5)))
                outcomes["coded " + coded_outcome(mutate(buf, rng) if rng.integers(2) else buf)] += 1
            else:
                outcomes["envelope " + envelope_outcome(envelope(rng))] += 1
        except Exception as exc:  # the finding
            print(f"input {i} (kind {kind}) raised {type(exc).__name__}: {exc}")
            outcomes["CRASH"] += 1
    seconds = time.perf_counter() - started
    for outcome, n in sorted(outcomes.items()):
        print(f"{n:>9}  {outcome}")
    print(f"{args.inputs} inputs in {seconds:.0f} s ({args.inputs / seconds:.0f}/s); unexpected: {outcomes['CRASH']}")


if __name__ == "__main__":
    main()
