"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

A 32-byte secret (a self-mask seed, an X25519 private key) is an integer below 2^256, so any prime
above that holds it whole; the Mersenne prime 2^521 - 1 is prime beyond doubt and makes the
arithmetic plain Python integers. Shares are evaluations of a random polynomial of degree t - 1 at
the points 1..n; any t of them give the secret back by Lagrange interpolation at 0, fewer give
nothing. Coefficients come from `secrets` (the OS's CSPRNG).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8): a share's value as fixed-width big-endian bytes
SECRET_BYTES = 32


class ShamirError(ValueError):
    """Shares that cannot give a secret back: too few, repeated or out-of-field points, bad bytes."""


def split(secret: int, threshold: int, points: Sequence[int], prime: int = PRIME) -> dict[int, int]:
    """{x: f(x)} for each point x, with f(0) = secret and deg f = threshold - 1."""
    if not 0 <= secret < prime:
        raise ShamirError("secret outside the field")
    if not 1 <= threshold <= len(points):
        raise ShamirError(f"threshold {threshold} needs 1..{len(points)} points")
    if len(set(points)) != len(points) or any(not 0 < x < prime for x in points):
        raise ShamirError("points must be distinct and nonzero in the field")
    coefficients = [secret] + [secrets.randbelow(prime) for _ in range(threshold - 1)]
    return {x: evaluate(coefficients, x, prime) for x in points}


def evaluate(coefficients: Sequence[int], x: int, prime: int = PRIME) -> int:
    """f(x) mod prime by Horner's rule; coefficients[0] is the constant term."""
    value = 0
    for c in reversed(coefficients):
        value = (value * x + c) % prime
    return value


def combine(shares: Mapping[int, int], threshold: int, prime: int = PRIME) -> int:
    """f(0) from at least `threshold` shares {x: f(x)}.

    The first `threshold` points by value interpolate; every further share must lie on the same
    polynomial, so one wrong share among more than `threshold` is caught instead of silently
    giving a wrong secret.
    """
    if len(shares) < threshold:
        raise ShamirError(f"{len(shares)} shares, {threshold} needed")
    if any(not 0 < x < prime for x in shares):
        raise ShamirError("a share's point is zero or outside the field")
    points = sorted(shares)
    basis, extra = points[:threshold], points[threshold:]
    for x in extra:
        if interpolate(shares, basis, x, prime) != shares[x] % prime:
            raise ShamirError("the shares do not lie on one polynomial of this degree")
    return interpolate(shares, basis, 0, prime)


def interpolate(shares: Mapping[int, int], basis: Sequence[int], at: int, prime: int = PRIME) -> int:
    """The polynomial through the shares at `basis`, evaluated at `at` (Lagrange)."""
    value = 0
    for i in basis:
        num, den = 1, 1
        for j in basis:
            if j != i:
                num = num * (at - j) % prime
                den = den * (i - j) % prime
        value = (value + shares[i] * num * pow(den, -1, prime)) % prime
    return value


def split_bytes(secret: bytes, threshold: int, points: Sequence[int]) -> dict[int, bytes]:
    """`split` of a 32-byte secret, each share as SHARE_BYTES big-endian bytes."""
    if len(secret) != SECRET_BYTES:
        raise ShamirError(f"secret is {len(secret)} bytes, {SECRET_BYTES} expected")
    return {x: y.to_bytes(SHARE_BYTES, "big") for x, y in split(int.from_bytes(secret, "big"), threshold, points).items()}


def combine_bytes(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The 32-byte secret back from byte shares; ShamirError when they cannot hold one."""
    values = {}
    for x, y in shares.items():
        if len(y) != SHARE_BYTES:
            raise ShamirError(f"a share is {len(y)} bytes, {SHARE_BYTES} expected")
        values[x] = int.from_bytes(y, "big")
        if values[x] >= PRIME:
            raise ShamirError("a share's value is outside the field")
    secret = combine(values, threshold)
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ShamirError("the shares do not lie on one polynomial of this degree")  # wrong or forged shares
    return secret.to_bytes(SECRET_BYTES, "big")
