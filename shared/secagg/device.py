"""The device's side of SecAgg+: keys, shares, the masked upload, and its answer at unmasking.

One `DeviceSession` per attempt: its X25519 keys and self-mask seed live only in it, and a new
attempt makes a new one, so no mask is ever reused. The device trusts the server for nothing but
relaying: it checks each neighbour's signature, what each share's ciphertext says about its sender
and receiver, and that the server's survivor and dropped lists are disjoint and cover exactly the
neighbours whose shares it holds; it reveals at most one kind of share for any neighbour.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from fleettune.shared.secagg import primitives as crypto
from fleettune.shared.secagg import shamir
from fleettune.shared.secagg.fixed_point import Encoding
from fleettune.shared.secagg.messages import Context, Reason, SecAggError, pack, unpack

SIGNATURE_BYTES = 64


def commitment(ctx: Context, device: str, seed: bytes) -> bytes:
    """What a device commits to for its self-mask seed, so rebuilt seeds can be checked."""
    return hashlib.sha256(ctx.label("seed", device) + seed).digest()


def survivors_label(ctx: Context, survivors: tuple[str, ...]) -> bytes:
    """What the consistency check signs: the attempt and the digest of its sorted survivor list."""
    return ctx.label("survivors") + hashlib.sha256(pack(list(survivors))).digest()


def mask_sign(a: str, b: str) -> int:
    """+1 for the device whose id sorts first in a pair, -1 for the other: their masks cancel."""
    return 1 if a < b else -1


def pairwise_mask(ctx: Context, own_secret: bytes, peer_public: bytes, length: int, dtype) -> np.ndarray:
    return crypto.mask(crypto.agree(own_secret, peer_public, ctx.label("mask")), length, dtype)


def share_key(ctx: Context, own_secret: bytes, peer_public: bytes) -> bytes:
    return crypto.agree(own_secret, peer_public, ctx.label("share-key"))


class DeviceSession:
    def __init__(self, ctx: Context, device: str, identity: bytes, encoding: Encoding | None, threshold: int,
                 min_survivors: int = 2) -> None:
        """`encoding` and `threshold` may come later, with the stages that carry them (masked, share)."""
        self.ctx, self.device, self.identity = ctx, device, identity
        self.encoding, self.threshold, self.min_survivors = encoding, threshold, max(2, min_survivors)
        self.c_sk, self.s_sk = crypto.agreement_key(), crypto.agreement_key()
        self.seed = os.urandom(crypto.KEY_BYTES)
        self.neighbours: dict[str, dict] = {}  # live neighbours with verified keys, by device id
        self.inbox: dict[str, bytes] = {}  # ciphertexts of shares sent to this device, by sender
        self.revealed = False
        self.signed: tuple[str, ...] | None = None  # the survivor list it signed in the consistency check
        self.refused: list[tuple[str, Reason]] = []  # neighbours whose keys or shares did not check out

    # stage 0
    def advertise(self) -> dict:
        c_pk, s_pk = crypto.agreement_public(self.c_sk), crypto.agreement_public(self.s_sk)
        sig = crypto.sign(self.identity, self.ctx.label("advertise", self.device) + c_pk + s_pk)
        return {"device": self.device, "c_pk": c_pk, "s_pk": s_pk, "sig": sig}

    # stage 1
    def share(self, offer: dict) -> dict:
        """Shares of the seed and of the masking key for each neighbour whose keys check out.

        `offer` is what the server relays: {"threshold": t, "neighbours": {id: {"c_pk", "s_pk", "sig",
        "identity", "point"}}}. A threshold at or below half the neighbours is refused: with it a
        server could collect both kinds of share for a device from honest neighbours.
        """
        self.threshold = offer.get("threshold", self.threshold)
        if not isinstance(self.threshold, int) or self.threshold * 2 <= len(offer.get("neighbours", {})):
            raise SecAggError(Reason.INCONSISTENT, f"threshold {self.threshold} for {len(offer.get('neighbours', {}))} neighbours")
        for peer, keys in offer.get("neighbours", {}).items():
            try:
                crypto.verify(keys["identity"], keys["sig"],
                              self.ctx.label("advertise", peer) + keys["c_pk"] + keys["s_pk"])
            except (crypto.CryptoError, KeyError, TypeError):
                self.refused.append((peer, Reason.BAD_SIGNATURE))
                continue  # a neighbour whose keys the server cannot vouch for is treated as dropped
            if peer != self.device:
                self.neighbours[peer] = keys
        if len(self.neighbours) < self.threshold:
            raise SecAggError(Reason.TOO_FEW_SHARES, f"{len(self.neighbours)} live neighbours, threshold {self.threshold}")
        points = {peer: int(k["point"]) for peer, k in self.neighbours.items()}
        seed_shares = shamir.split_bytes(self.seed, self.threshold, list(points.values()))
        key_shares = shamir.split_bytes(self.s_sk, self.threshold, list(points.values()))
        sealed = {}
        for peer, point in points.items():
            key = share_key(self.ctx, self.c_sk, self.neighbours[peer]["c_pk"])
            plaintext = pack([self.device, peer, seed_shares[point], key_shares[point]])
            sealed[peer] = crypto.seal(key, plaintext, self.ctx.label("share", self.device, peer))
        commit = commitment(self.ctx, self.device, self.seed)
        sig = crypto.sign(self.identity, self.ctx.label("commit", self.device) + commit)
        return {"device": self.device, "commitment": commit, "sig": sig, "shares": sealed}

    # stage 2
    def masked_input(self, inbox: dict[str, bytes], update: np.ndarray, weight: int,
                     rng: np.random.Generator | None = None) -> np.ndarray:
        """[w, w·x] + self mask + Σ ± pairwise masks, mod 2^bits, over the neighbours whose shares
        arrived (the server relays the same set both ways, so pairwise masks cancel)."""
        self.inbox = {peer: ct for peer, ct in inbox.items() if peer in self.neighbours}
        if len(self.inbox) < self.threshold:
            raise SecAggError(Reason.TOO_FEW_SHARES, f"shares from {len(self.inbox)} neighbours, threshold {self.threshold}")
        enc = self.encoding
        if enc is None:
            raise SecAggError(Reason.MALFORMED, "no encoding for this attempt's masked input")
        y = enc.encode(update, weight, rng or np.random.default_rng())
        length = y.shape[0]
        y = y + crypto.mask(self.seed, length, enc.dtype)  # numpy integers wrap mod 2^bits
        for peer in self.inbox:
            m = pairwise_mask(self.ctx, self.s_sk, self.neighbours[peer]["s_pk"], length, enc.dtype)
            y = y + m if mask_sign(self.device, peer) > 0 else y - m
        return y

    # stage 3
    def sign_survivors(self, request: dict) -> dict:
        """Sign the survivor list the server announces (Bonawitz et al.'s consistency check): the
        unmasking goes ahead only over a list that enough of its members signed, so a server cannot
        shrink "the survivors" to one device and unmask it alone."""
        survivors = request.get("survivors")
        if (not isinstance(survivors, list) or not all(isinstance(d, str) for d in survivors)
                or len(set(survivors)) != len(survivors) or self.device not in survivors):
            raise SecAggError(Reason.INCONSISTENT, "the survivor list is not a list of distinct ids with this device")
        if len(survivors) < self.min_survivors:
            # a sum over too few devices is close to one device's update: refuse to help unmask it
            raise SecAggError(Reason.INCONSISTENT, f"{len(survivors)} survivors, at least {self.min_survivors} required")
        self.signed = tuple(sorted(survivors))
        return {"device": self.device, "sig": crypto.sign(self.identity, survivors_label(self.ctx, self.signed))}

    # stage 4
    def unmask(self, request: dict) -> dict:
        """For each neighbour in `survivors` its seed share, for each in `dropped` its key share;
        never both for one, and only once; and only over the survivor list this device signed,
        which at least t − 1 of its neighbours on that list signed too."""
        survivors, dropped = set(request.get("survivors", ())), set(request.get("dropped", ()))
        if self.revealed:
            raise SecAggError(Reason.DUPLICATE_STAGE, "this device already answered the unmasking")
        if self.signed is None:
            raise SecAggError(Reason.INCONSISTENT, "no survivor list was signed in this attempt")
        signed = set(self.signed)
        if survivors & dropped or survivors | dropped != set(self.inbox) or not survivors <= signed or dropped & signed:
            raise SecAggError(Reason.INCONSISTENT, "survivor and dropped lists overlap, miss a neighbour, or "
                                                   "disagree with the signed survivor list")
        message = survivors_label(self.ctx, self.signed)
        valid = 0
        for peer, sig in (request.get("signatures") or {}).items():
            if peer in self.neighbours and peer in signed and peer != self.device:
                try:
                    crypto.verify(self.neighbours[peer]["identity"], sig, message)
                    valid += 1
                except (crypto.CryptoError, TypeError):
                    self.refused.append((peer, Reason.BAD_SIGNATURE))
        if valid + 1 < self.threshold:
            raise SecAggError(Reason.INCONSISTENT, f"{valid} neighbours signed the survivor list, "
                                                   f"{self.threshold - 1} needed")
        self.revealed = True
        seed_shares, key_shares = {}, {}
        for peer, ct in self.inbox.items():
            key = share_key(self.ctx, self.c_sk, self.neighbours[peer]["c_pk"])
            try:
                plain = unpack(crypto.open_sealed(key, ct, self.ctx.label("share", peer, self.device)), list)
            except (crypto.CryptoError, SecAggError):
                self.refused.append((peer, Reason.BAD_CIPHERTEXT))
                continue  # a neighbour's bad ciphertext: that share is simply not revealed
            if len(plain) != 4 or plain[0] != peer or plain[1] != self.device:
                self.refused.append((peer, Reason.BAD_CIPHERTEXT))
                continue
            (seed_shares if peer in survivors else key_shares)[peer] = plain[2 if peer in survivors else 3]
        return {"device": self.device, "seed_shares": seed_shares, "key_shares": key_shares}


