"""The server's side of SecAgg+: checks on each stage's messages, what it relays, and the unmasking.

Pure functions over what the stages collected, so the Redis coordinator and the in-memory
simulation run the same code. Each check raises `SecAggError` with a named reason; a refused
message changes nothing, so one hostile device cannot stop the round for the honest ones.
"""

from __future__ import annotations

import random

import numpy as np

from fleettune.shared.secagg import primitives as crypto
from fleettune.shared.secagg import shamir
from fleettune.shared.secagg.device import SIGNATURE_BYTES, commitment, mask_sign, pairwise_mask, survivors_label
from fleettune.shared.secagg.fixed_point import Encoding
from fleettune.shared.secagg.graph import Graph
from fleettune.shared.secagg.messages import Context, Reason, SecAggError, field

MAX_CIPHERTEXT_BYTES = 512  # a sealed share pair is 12 + msgpack(2 ids, 2 × 66 bytes) + 16


def check_advert(ctx: Context, raw: dict, device: str, cohort, identities: dict[str, bytes]) -> dict:
    """Stage 0: a device's two public keys, signed by its registered identity for this attempt.
    The neighbour graph is drawn afterwards, over the devices that advertised."""
    if device not in cohort:
        raise SecAggError(Reason.NOT_IN_STAGE, f"{device} is not in this attempt's cohort")
    if field(raw, "device", str) != device:
        raise SecAggError(Reason.MALFORMED, "the message names another device")
    c_pk, s_pk = field(raw, "c_pk", bytes, crypto.KEY_BYTES), field(raw, "s_pk", bytes, crypto.KEY_BYTES)
    sig = field(raw, "sig", bytes, SIGNATURE_BYTES)
    identity = identities.get(device)
    if identity is None:
        raise SecAggError(Reason.UNKNOWN_IDENTITY, f"no identity key registered for {device}")
    try:
        crypto.verify(identity, sig, ctx.label("advertise", device) + c_pk + s_pk)
    except crypto.CryptoError:
        raise SecAggError(Reason.BAD_SIGNATURE, "the keys are not signed by the device's identity for this attempt") from None
    if c_pk == s_pk:
        raise SecAggError(Reason.MALFORMED, "the two round keys must differ")
    return {"device": device, "c_pk": c_pk, "s_pk": s_pk, "sig": sig}


def offer_for(device: str, graph: Graph, threshold: int, adverts: dict[str, dict], identities: dict[str, bytes]) -> dict:
    """Stage 1's input for one device: its neighbours (all advertised), with keys, signatures and points."""
    # a neighbour whose identity is gone (revoked since it advertised) is left out: the device could not check it
    return {"threshold": threshold, "neighbours": {peer: {"c_pk": adverts[peer]["c_pk"], "s_pk": adverts[peer]["s_pk"],
                                  "sig": adverts[peer]["sig"], "identity": identities[peer],
                                  "point": graph.point(peer)}
                           for peer in graph.neighbours(device) if peer in adverts and peer in identities}}


def check_shares(ctx: Context, raw: dict, device: str, graph: Graph, adverts: dict[str, dict],
                 identities: dict[str, bytes]) -> dict:
    """Stage 1: one sealed share pair per live neighbour, and a signed commitment to the seed."""
    if device not in adverts:
        raise SecAggError(Reason.NOT_IN_STAGE, f"{device} did not advertise keys in this attempt")
    if field(raw, "device", str) != device:
        raise SecAggError(Reason.MALFORMED, "the message names another device")
    commit, sig = field(raw, "commitment", bytes, 32), field(raw, "sig", bytes, SIGNATURE_BYTES)
    if device not in identities:
        raise SecAggError(Reason.UNKNOWN_IDENTITY, f"no identity key registered for {device}")
    try:
        crypto.verify(identities[device], sig, ctx.label("commit", device) + commit)
    except crypto.CryptoError:
        raise SecAggError(Reason.BAD_SIGNATURE, "the seed commitment is not signed for this attempt") from None
    shares = field(raw, "shares", dict)
    live = {peer for peer in graph.neighbours(device) if peer in adverts}
    for peer, ct in shares.items():
        if peer not in live:
            raise SecAggError(Reason.WRONG_RECIPIENT, f"a share for {peer!r}, not a live neighbour of {device}")
        if not isinstance(ct, bytes) or not crypto.NONCE_BYTES + 16 < len(ct) <= MAX_CIPHERTEXT_BYTES:
            raise SecAggError(Reason.MALFORMED, f"the share for {peer!r} is not a sealed share pair")
    return {"device": device, "commitment": commit, "sig": sig, "shares": dict(shares)}


def relay(shared: dict[str, dict]) -> dict[str, dict[str, bytes]]:
    """Stage 2's input for every device that shared: the sealed shares addressed to it, by sender,
    from senders it shared with too. Only mutual pairs mask each other, so a device that leaves a
    neighbour out of its shares cannot leave an uncancelled mask in the sum."""
    inboxes: dict[str, dict[str, bytes]] = {d: {} for d in shared}
    for sender, msg in shared.items():
        for recipient, ct in msg["shares"].items():
            if recipient in shared and sender in shared[recipient]["shares"]:
                inboxes[recipient][sender] = ct
    return inboxes


def check_masked(vector: np.ndarray, device: str, shared, encoding: Encoding, length: int) -> np.ndarray:
    """Stage 2: a masked vector of the attempt's length and modulus from a device that shared."""
    if device not in shared:
        raise SecAggError(Reason.NOT_IN_STAGE, f"{device} did not share keys in this attempt")
    if not isinstance(vector, np.ndarray) or vector.dtype != encoding.dtype or vector.shape != (length,):
        raise SecAggError(Reason.BAD_VECTOR, f"expected {length} values of {encoding.dtype} (mod 2^{encoding.bits})")
    return vector


class MaskedSum:
    """Masked inputs folded into one running sum mod 2^bits as they are read: the close holds one
    vector, not n (the masks cancel in any order)."""

    def __init__(self, encoding: Encoding) -> None:
        self.dtype = encoding.dtype
        self.devices: list[str] = []
        self.total: np.ndarray | None = None

    def add(self, device: str, vector: np.ndarray) -> None:
        if self.total is None:
            self.total = np.zeros(vector.shape[0], dtype=self.dtype)
        self.total += vector  # numpy integers wrap: the sum is mod 2^bits
        self.devices.append(device)


def check_consistency(ctx: Context, raw: dict, device: str, survivors: list[str], identity: bytes | None) -> dict:
    """Stage 3: a survivor's signature on the survivor list (sorted), by its identity key."""
    if device not in survivors:
        raise SecAggError(Reason.NOT_IN_STAGE, f"{device} sent no masked input in this attempt")
    if field(raw, "device", str) != device:
        raise SecAggError(Reason.MALFORMED, "the message names another device")
    sig = field(raw, "sig", bytes, SIGNATURE_BYTES)
    try:
        crypto.verify(identity or b"", sig, survivors_label(ctx, tuple(sorted(survivors))))
    except crypto.CryptoError:
        raise SecAggError(Reason.BAD_SIGNATURE, "not this device's signature on this attempt's survivor list") from None
    return {"sig": sig}


def unmask_request(held: set[str], survivors: set[str], signatures: dict[str, bytes]) -> dict:
    """Stage 4's input for a device that signed the survivor list and holds shares from `held`:
    which of them survived, and its neighbours' signatures on the list."""
    return {"survivors": sorted(held & survivors), "dropped": sorted(held - survivors), "signatures": signatures}


def check_unmask(raw: dict, device: str, held: set[str], survivors: set[str], signers=None) -> dict:
    """Stage 4: seed shares of surviving neighbours, key shares of dropped ones; never both for one.
    `signers`: the devices that signed the survivor list (None: any survivor may answer)."""
    if device not in survivors or (signers is not None and device not in signers):
        raise SecAggError(Reason.NOT_IN_STAGE, f"{device} sent no masked input, or did not sign the survivor list")
    if field(raw, "device", str) != device:
        raise SecAggError(Reason.MALFORMED, "the message names another device")
    seeds, keys = field(raw, "seed_shares", dict), field(raw, "key_shares", dict)
    both = set(seeds) & set(keys)
    if both:
        raise SecAggError(Reason.BOTH_SHARES, f"both kinds of share for {sorted(both)[:3]}")
    for kind, part, allowed in (("seed", seeds, held & survivors), ("key", keys, held - survivors)):
        for peer, share in part.items():
            if peer not in allowed:
                raise SecAggError(Reason.WRONG_RECIPIENT, f"a {kind} share for {peer!r}, which the server did not ask for")
            if not isinstance(share, bytes) or len(share) != shamir.SHARE_BYTES:
                raise SecAggError(Reason.MALFORMED, f"the {kind} share for {peer!r} is not {shamir.SHARE_BYTES} bytes")
    return {"device": device, "seed_shares": dict(seeds), "key_shares": dict(keys)}


def unmask(ctx: Context, encoding: Encoding, graph: Graph, threshold: int, adverts: dict[str, dict],
           commitments: dict[str, bytes], held: dict[str, set[str]], masked: dict[str, np.ndarray] | MaskedSum,
           answers: dict[str, dict]) -> tuple[float, np.ndarray]:
    """(Σw, Σ w·x) over the devices in `masked`: their sum, less each survivor's self mask (from its
    seed's shares) and the pairwise masks survivors added for devices that dropped after sharing
    (from those devices' key shares). `commitments`: each device that shared, its seed commitment;
    `held`: each device, the senders whose shares it holds (`relay`), the same pairs that masked
    each other. SecAggError(too_few_shares | bad_shares) when a secret cannot be rebuilt and
    checked: the attempt then restarts with fresh keys."""
    if not isinstance(masked, MaskedSum):
        folded = MaskedSum(encoding)
        for device, vector in masked.items():
            folded.add(device, vector)
        masked = folded
    survivors = set(masked.devices)
    if not survivors:
        raise SecAggError(Reason.TOO_FEW_SHARES, "no masked input")
    total, length = masked.total.copy(), masked.total.shape[0]
    for device in sorted(survivors):
        seed = _rebuild(device, "seed_shares", graph, threshold, answers,
                        lambda secret, d=device: commitment(ctx, d, secret) == commitments[d])
        total -= crypto.mask(seed, length, encoding.dtype)
    for gone in sorted(set(commitments) - survivors):
        s_sk = _rebuild(gone, "key_shares", graph, threshold, answers,
                        lambda secret, d=gone: crypto.agreement_public(secret) == adverts[d]["s_pk"])
        for peer in sorted(held.get(gone, set()) & survivors):  # the survivors that masked against it
                m = pairwise_mask(ctx, s_sk, adverts[peer]["s_pk"], length, encoding.dtype)
                total = total - m if mask_sign(peer, gone) > 0 else total + m
    weight_sum, weighted = encoding.decode_sum(total)
    check_range(encoding, len(survivors), weight_sum, weighted)
    return weight_sum, weighted


def check_range(encoding: Encoding, devices: int, weight_sum: float, weighted: np.ndarray) -> None:
    """What the server can still check once masks hide each update: the sum itself. n devices of
    weight 1..max_weight, each ‖w·x‖ ≤ w·clip, give n ≤ Σw ≤ n·max_weight and ‖Σ w·x‖ ≤ Σw·clip (plus
    the rounding). A device that ignored its clip or its weight cap can break these only by enough
    to show: anything within them it can still do (see docs/secure-aggregation.md)."""
    rounding = devices * 2.0 ** -encoding.frac_bits * np.sqrt(weighted.size)
    # distributed DP: the devices' noise sums to N(0, n·σ²) per coordinate, whose norm is within σ√n(√d + 8)
    rounding += encoding.noise_std * np.sqrt(devices) * (np.sqrt(weighted.size) + 8)
    if not devices <= weight_sum <= devices * encoding.max_weight:
        raise SecAggError(Reason.OUT_OF_RANGE, f"sum of weights {weight_sum:g} outside [{devices}, "
                                               f"{devices * encoding.max_weight}] for {devices} devices")
    norm = float(np.linalg.norm(weighted))
    if norm > weight_sum * encoding.clip + rounding:
        raise SecAggError(Reason.OUT_OF_RANGE, f"‖Σ w·x‖ = {norm:.4g} > Σw·clip = {weight_sum * encoding.clip:.4g}")


def _rebuild(device: str, kind: str, graph: Graph, threshold: int, answers: dict[str, dict],
             check) -> bytes:
    """The secret `kind` of `device` from exactly `threshold` of its shares, accepted only when
    `check(secret)` (its commitment, or its advertised public key) holds. A bad share among them is
    met by trying other subsets (the first, the last, then random ones): a few lying neighbours
    cannot block the round, and no time goes into checking every share against every other."""
    shares = {graph.point(holder): a[kind][device] for holder, a in answers.items() if device in a[kind]}
    name = kind.split("_")[0]
    if len(shares) < threshold:
        raise SecAggError(Reason.TOO_FEW_SHARES, f"{len(shares)} {name} shares of {device}, {threshold} needed")
    points = sorted(shares)
    subsets = [points[:threshold], points[-threshold:]]
    rng = random.Random(device)  # the same subsets on a redone close
    subsets += [sorted(rng.sample(points, threshold)) for _ in range(3 if len(points) > threshold else 0)]
    for subset in subsets:
        try:
            secret = shamir.combine_bytes({x: shares[x] for x in subset}, threshold)
        except shamir.ShamirError:
            continue
        if check(secret):
            return secret
    raise SecAggError(Reason.BAD_SHARES, f"no subset of {device}'s {name} shares rebuilds its committed {name}")
