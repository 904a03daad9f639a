"""Secure aggregation (SecAgg+): the sharing, the crypto, the encoding, the graph, and whole attempts
with dropouts and hostile messages, on the same functions the pipeline runs."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fleettune.shared.errors import ConfigError
from fleettune.shared.secagg import fixed_point, graph, server, shamir, simulation
from fleettune.shared.secagg import primitives as crypto
from fleettune.shared.secagg.device import DeviceSession
from fleettune.shared.secagg.messages import Context, Reason, SecAggError, pack, unpack


# --- Shamir ---------------------------------------------------------------------------------------

def test_shamir_known_vector():
    # Wikipedia's worked example: f(x) = 1234 + 166x + 94x², secret 1234, threshold 3
    coefficients = [1234, 166, 94]
    shares = {x: shamir.evaluate(coefficients, x) for x in range(1, 7)}
    assert shares == {1: 1494, 2: 1942, 3: 2578, 4: 3402, 5: 4414, 6: 5614}
    for subset in ([1, 2, 3], [2, 4, 6], [4, 5, 6], [1, 3, 5, 6]):
        assert shamir.combine({x: shares[x] for x in subset}, 3) == 1234
    with pytest.raises(shamir.ShamirError, match="shares, 3 needed"):
        shamir.combine({1: 1494, 2: 1942}, 3)
    # a wrong share among more than the threshold is caught, not silently used
    with pytest.raises(shamir.ShamirError, match="one polynomial"):
        shamir.combine({1: 1494, 2: 1942, 3: 2578, 4: 3403}, 3)


def test_shamir_bytes_round_trip_and_fewer_than_threshold_say_nothing():
    secret = os.urandom(32)
    shares = shamir.split_bytes(secret, 5, list(range(1, 12)))
    assert all(len(s) == shamir.SHARE_BYTES for s in shares.values())
    assert shamir.combine_bytes({x: shares[x] for x in (2, 3, 5, 8, 11)}, 5) == secret
    assert shamir.combine_bytes(shares, 5) == secret  # all eleven agree
    # four shares interpolated as if the threshold were four give an unrelated field element
    wrong = shamir.combine({x: int.from_bytes(shares[x], "big") for x in (1, 2, 3, 4)}, 4)
    assert wrong != int.from_bytes(secret, "big")
    with pytest.raises(shamir.ShamirError):
        shamir.combine_bytes({1: shares[1][:-1], 2: shares[2]}, 2)
    with pytest.raises(shamir.ShamirError):
        shamir.split_bytes(secret, 3, [1, 1, 2])


# --- primitives -----------------------------------------------------------------------------------

def test_signatures_agreement_and_sealing():
    ident = crypto.identity_key()
    pub = crypto.identity_public(ident)
    sig = crypto.sign(ident, b"keys")
    crypto.verify(pub, sig, b"keys")
    with pytest.raises(crypto.CryptoError):
        crypto.verify(pub, sig, b"keys!")
    with pytest.raises(crypto.CryptoError):
        crypto.verify(crypto.identity_public(crypto.identity_key()), sig, b"keys")
    a, b = crypto.agreement_key(), crypto.agreement_key()
    k1 = crypto.agree(a, crypto.agreement_public(b), b"share")
    assert k1 == crypto.agree(b, crypto.agreement_public(a), b"share")
    assert k1 != crypto.agree(a, crypto.agreement_public(b), b"mask")  # one key per purpose
    sealed = crypto.seal(k1, b"secret share", b"from a to b")
    assert crypto.open_sealed(k1, sealed, b"from a to b") == b"secret share"
    with pytest.raises(crypto.CryptoError, match="authentication"):
        crypto.open_sealed(k1, sealed, b"from a to c")
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(crypto.CryptoError):
        crypto.open_sealed(k1, tampered, b"from a to b")
    with pytest.raises(crypto.CryptoError):
        crypto.agree(a, bytes(32), b"share")  # a low-order point


def test_masks_are_deterministic_per_key_and_look_uniform():
    key = os.urandom(32)
    m = crypto.mask(key, 200_000, np.uint32)
    assert np.array_equal(m, crypto.mask(key, 200_000, np.uint32))
    assert not np.array_equal(m, crypto.mask(os.urandom(32), 200_000, np.uint32))
    counts = np.bincount((m >> 28).astype(np.int64), minlength=16)  # top 4 bits: 16 equal bins
    chi2 = float(((counts - m.size / 16) ** 2 / (m.size / 16)).sum())
    assert chi2 < 50  # 15 degrees of freedom: p < 1e-5 beyond 50
    with pytest.raises(crypto.CryptoError):
        crypto.mask(b"short", 4, np.uint64)


# --- fixed point ----------------------------------------------------------------------------------

def test_modulus_follows_cohort_clip_and_weights():
    small = fixed_point.choose(100, 1.0, 64)
    assert small.bits == 32 and small.frac_bits >= 16
    big = fixed_point.choose(1000, 1.0, 1000)
    assert big.bits == 64 and big.frac_bits >= 30
    with pytest.raises(ConfigError):
        fixed_point.choose(10**9, 1e6, 10**6, precision_bits=40)


@pytest.mark.parametrize("n, clip, max_weight", [(50, 1.0, 64), (200, 5.0, 1000)])
def test_extreme_sums_do_not_wrap(n, clip, max_weight):
    enc = fixed_point.choose(n, clip, max_weight)
    rng = np.random.default_rng(0)
    for sign in (1.0, -1.0):
        x = np.zeros(8)
        x[3] = sign * clip  # the whole norm on one coordinate, every device at the largest weight
        total = np.zeros(9, dtype=enc.dtype)
        for _ in range(n):
            total += enc.encode(x, max_weight, rng)
        weight_sum, s = enc.decode_sum(total)
        assert weight_sum == n * max_weight
        assert abs(s[3] / weight_sum - sign * clip) <= enc.mean_error_bound(n, weight_sum)


def test_encoding_refuses_unclipped_and_out_of_range_weights():
    enc = fixed_point.choose(10, 1.0, 8)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="clipped"):
        enc.encode(np.full(4, 1.0), 1, rng)
    with pytest.raises(ValueError, match="clipped"):
        enc.encode(np.array([np.nan, 0.0]), 1, rng)
    with pytest.raises(ValueError, match="weight"):
        enc.encode(np.zeros(4), 9, rng)


# --- graph ----------------------------------------------------------------------------------------

def test_graph_is_regular_symmetric_and_keyed_by_the_secret_seed():
    cohort = [f"d{i:04d}" for i in range(400)]
    g = graph.build(cohort, b"s" * 32, degree=40)
    assert g.degree == 40
    for d in cohort:
        nb = g.neighbours(d)
        assert len(set(nb)) == g.degree and d not in nb
        assert all(d in g.neighbours(p) for p in nb)
    assert graph.build(cohort, b"s" * 32, degree=40) == g
    assert graph.build(cohort, b"t" * 32, degree=40).order != g.order
    small = graph.build(["a", "b", "c", "d"], b"s" * 32)
    assert set(small.neighbours("a")) == {"b", "c", "d"}  # small cohorts: everyone is a neighbour
    assert graph.default_threshold(g.degree) > g.degree / 2
    # k grows as log n: a fraction of the cohort at a thousand devices, barely more at ten thousand
    assert graph.default_degree(30) == 29 and graph.default_degree(1000) < 400 < 1000
    assert graph.default_degree(10_000) - graph.default_degree(1000) < 60
    assert graph.default_degree(1000, dropout=0.1) < graph.default_degree(1000)


# --- whole attempts -------------------------------------------------------------------------------

def cohort(n: int, d: int = 400, seed: int = 0, clip: float = 1.0):
    rng = np.random.default_rng(seed)
    ids = {f"dev-{i:04d}": crypto.identity_key() for i in range(n)}
    updates = {}
    for k in ids:
        x = rng.normal(size=d)
        updates[k] = x * (rng.uniform(0.1, 1.0) * clip / np.linalg.norm(x))
    weights = {k: int(rng.integers(1, 33)) for k in ids}
    return ids, updates, weights


def fedavg(updates, weights, devices):
    return sum(weights[k] * updates[k] for k in devices) / sum(weights[k] for k in devices)


def test_the_sum_equals_plain_fedavg_within_the_rounding_bound():
    ids, updates, weights = cohort(12)
    enc = fixed_point.choose(12, 1.0, 32)
    res = simulation.run(updates, weights, enc, ids)
    assert res.survivors == sorted(ids) and res.attempts == 1
    assert res.weight_sum == sum(weights.values())
    err = np.abs(res.mean - fedavg(updates, weights, ids)).max()
    assert 0 < err <= res.bound


@pytest.mark.parametrize("stage", simulation.STAGES)
def test_a_third_dropping_at_any_stage_still_gives_the_sum(stage):
    n = 30
    ids, updates, weights = cohort(n, seed=1)
    gone = set(sorted(ids)[::3])  # 10 of 30
    enc = fixed_point.choose(n, 1.0, 32)
    res = simulation.run(updates, weights, enc, ids, drops=lambda attempt, s: gone if s == stage else set())
    uploaded = stage in ("consistency", "unmask")
    expected = set(ids) if uploaded else set(ids) - gone  # once it uploaded, a device still counts
    assert set(res.survivors) == expected and res.attempts == 1
    assert np.abs(res.mean - fedavg(updates, weights, expected)).max() <= res.bound


def test_devices_vanishing_between_every_stage_still_give_the_sum():
    n = 36
    ids, updates, weights = cohort(n, seed=2)
    order = sorted(ids)
    waves = {"share": set(order[0:4]), "masked": set(order[10:14]), "unmask": set(order[20:24])}
    enc = fixed_point.choose(n, 1.0, 32)
    res = simulation.run(updates, weights, enc, ids, drops=lambda a, s: waves.get(s, set()))
    expected = set(ids) - waves["share"] - waves["masked"]
    assert set(res.survivors) == expected
    assert np.abs(res.mean - fedavg(updates, weights, expected)).max() <= res.bound


def test_below_the_threshold_the_round_restarts_with_fresh_keys():
    n = 10
    ids, updates, weights = cohort(n, seed=3)
    many = set(sorted(ids)[:6])  # 6 of 10 vanish at unmasking in the first attempt: too few shares
    enc = fixed_point.choose(n, 1.0, 32)
    res = simulation.run(updates, weights, enc, ids, drops=lambda a, s: many if (a, s) == (1, "unmask") else set())
    assert res.attempts == 2 and res.survivors == sorted(ids)
    first = {raw for stage, _, raw in res.transcript if stage == "advertise"}
    assert len(first) == 2 * n  # every advertisement differs: no key reused across attempts
    assert np.abs(res.mean - fedavg(updates, weights, ids)).max() <= res.bound
    with pytest.raises(SecAggError, match="no attempt"):
        simulation.run(updates, weights, enc, ids, max_attempts=2,
                       drops=lambda a, s: many if s == "unmask" else set())


def test_what_the_server_sees_reveals_no_single_update():
    n = 8
    ids, updates, weights = cohort(n, d=20_000, seed=4)
    zero = {k: np.zeros_like(v) for k, v in updates.items()}
    enc = fixed_point.choose(n, 1.0, 32)
    seen = {}
    for name, ups in (("real", updates), ("zero", zero)):
        res = simulation.run(ups, weights, enc, ids)
        seen[name] = {d: np.frombuffer(raw, dtype=enc.dtype) for stage, d, raw in res.transcript if stage == "masked"}
    for d, y in seen["real"].items():
        counts = np.bincount((y >> 28).astype(np.int64), minlength=16)
        chi2 = float(((counts - y.size / 16) ** 2 / (y.size / 16)).sum())
        assert chi2 < 50, d  # uniform mod 2^32, whatever the update
        signed = enc.decode_sum(y)[1]
        assert abs(np.corrcoef(signed, updates[d])[0, 1]) < 0.05  # no trace of its own update
        # nor can it be told apart from a device that sent zeros
        z = seen["zero"][d]
        assert abs(float(np.mean(y >> 16)) - float(np.mean(z >> 16))) < 0.02 * 65536
    # no share, seed or private key travels in the clear: every stage-1 payload is sealed
    for stage, d, raw in res.transcript:
        if stage == "share":
            msg = unpack(raw)
            assert set(msg) == {"device", "commitment", "sig", "shares"}
            assert all(len(ct) > shamir.SHARE_BYTES * 2 for ct in msg["shares"].values())


# --- hostile messages -----------------------------------------------------------------------------

class Attempt:
    """One attempt's server-side state, stepped by hand so a test can slip a hostile message in."""

    def __init__(self, n=6, attempt=1):
        self.ids, self.updates, self.weights = cohort(n, d=50, seed=5)
        self.public = {d: crypto.identity_public(k) for d, k in self.ids.items()}
        self.enc = fixed_point.choose(n, 1.0, 32)
        self.ctx = Context("fed", 3, attempt)
        self.g = graph.build(self.ids, os.urandom(32))
        self.t = graph.default_threshold(self.g.degree)
        self.s = {d: DeviceSession(self.ctx, d, self.ids[d], self.enc, self.t) for d in self.ids}
        self.adverts = {d: server.check_advert(self.ctx, self.s[d].advertise(), d, self.ids, self.public) for d in self.ids}

    def share_all(self):
        self.shared = {d: server.check_shares(self.ctx, self.s[d].share(self.offer(d)), d, self.g, self.adverts, self.public)
                       for d in self.ids}
        self.inboxes = server.relay(self.shared)
        self.held = {d: set(box) for d, box in self.inboxes.items()}
        self.commitments = {d: m["commitment"] for d, m in self.shared.items()}
        self.masked = {d: self.s[d].masked_input(self.inboxes[d], self.updates[d], self.weights[d]) for d in self.ids}
        return self

    def offer(self, d):
        return server.offer_for(d, self.g, self.t, self.adverts, self.public)

    def request(self, d, survivors):
        """Its unmasking request, after every survivor signed the survivor list."""
        if getattr(self, "_signed", None) != survivors:
            self.signatures = {s: self.s[s].sign_survivors({"survivors": sorted(survivors)})["sig"] for s in survivors}
            self._signed = set(survivors)
        theirs = {p: self.signatures[p] for p in self.g.neighbours(d) if p in self.signatures}
        return server.unmask_request(self.held[d], survivors, theirs)


def test_forged_replayed_and_unknown_advertisements_are_refused():
    a = Attempt()
    dev = sorted(a.ids)[0]
    good = a.s[dev].advertise()
    forged = dict(good, sig=crypto.sign(crypto.identity_key(), Context("fed", 3, 1).label("advertise", dev) + good["c_pk"] + good["s_pk"]))
    with pytest.raises(SecAggError) as e:
        server.check_advert(a.ctx, forged, dev, a.ids, a.public)
    assert e.value.reason == Reason.BAD_SIGNATURE
    later = Context("fed", 3, 2)  # the same signed keys replayed into the next attempt
    with pytest.raises(SecAggError) as e:
        server.check_advert(later, good, dev, a.ids, a.public)
    assert e.value.reason == Reason.BAD_SIGNATURE
    with pytest.raises(SecAggError) as e:
        server.check_advert(a.ctx, good, dev, a.ids, {})
    assert e.value.reason == Reason.UNKNOWN_IDENTITY
    with pytest.raises(SecAggError) as e:
        server.check_advert(a.ctx, dict(good, c_pk=b"x"), dev, a.ids, a.public)
    assert e.value.reason == Reason.MALFORMED
    with pytest.raises(SecAggError) as e:
        server.check_advert(a.ctx, good, "stranger", a.ids, a.public)
    assert e.value.reason == Reason.NOT_IN_STAGE
    with pytest.raises(SecAggError) as e:
        unpack(b"\xc1garbage")
    assert e.value.reason == Reason.MALFORMED


def test_hostile_shares_vectors_and_unmasking_answers_are_refused_and_the_round_survives():
    a = Attempt(n=8).share_all()
    devs = sorted(a.ids)
    evil, victim = devs[0], devs[1]
    msg = a.s[evil].share(a.offer(evil))
    with pytest.raises(SecAggError) as e:  # a share addressed to a device outside its neighbourhood
        server.check_shares(a.ctx, dict(msg, shares=dict(msg["shares"], stranger=b"x" * 200)), evil, a.g, a.adverts, a.public)
    assert e.value.reason == Reason.WRONG_RECIPIENT
    with pytest.raises(SecAggError) as e:  # a commitment swapped by someone without the identity key
        server.check_shares(a.ctx, dict(msg, commitment=os.urandom(32)), evil, a.g, a.adverts, a.public)
    assert e.value.reason == Reason.BAD_SIGNATURE
    with pytest.raises(SecAggError) as e:
        server.check_masked(a.masked[evil][:-1], evil, a.shared, a.enc, a.masked[victim].shape[0])
    assert e.value.reason == Reason.BAD_VECTOR
    with pytest.raises(SecAggError) as e:
        server.check_masked(a.masked[evil].astype(np.uint64), evil, a.shared, a.enc, a.masked[victim].shape[0])
    assert e.value.reason == Reason.BAD_VECTOR
    survivors = set(devs)
    answer = a.s[evil].unmask(a.request(evil, survivors))
    both = dict(answer, key_shares={victim: answer["seed_shares"][victim]})
    with pytest.raises(SecAggError) as e:  # both kinds for one device would expose its update
        server.check_unmask(both, evil, a.held[evil], survivors)
    assert e.value.reason == Reason.BOTH_SHARES
    with pytest.raises(SecAggError) as e:  # a key share for a device that survived: not asked for
        server.check_unmask(dict(answer, seed_shares={}, key_shares={victim: answer["seed_shares"][victim]}),
                            evil, a.held[evil], survivors)
    assert e.value.reason == Reason.WRONG_RECIPIENT
    with pytest.raises(SecAggError) as e:  # a device answers the stage only once
        a.s[evil].unmask(a.request(evil, survivors))
    assert e.value.reason == Reason.DUPLICATE_STAGE
    # the honest answers (and the evil device's honest one) still unmask the exact sum
    answers = {d: server.check_unmask(answer if d == evil else a.s[d].unmask(a.request(d, survivors)),
                                      d, a.held[d], survivors) for d in devs}
    w, total = server.unmask(a.ctx, a.enc, a.g, a.t, a.adverts, a.commitments, a.held, a.masked, answers)
    exact = fedavg(a.updates, a.weights, devs)
    assert np.abs(total / w - exact).max() <= a.enc.mean_error_bound(len(devs), w)


def test_a_tampered_ciphertext_is_named_and_forged_shares_are_outvoted_or_caught():
    a = Attempt(n=8).share_all()
    devs = sorted(a.ids)
    sender, receiver = devs[2], devs[3]
    ct = a.shared[sender]["shares"][receiver]
    a.s[receiver].inbox[sender] = ct[:-1] + bytes([ct[-1] ^ 0x55])
    survivors = set(devs)
    answer = a.s[receiver].unmask(a.request(receiver, survivors))
    assert (sender, Reason.BAD_CIPHERTEXT) in a.s[receiver].refused and sender not in answer["seed_shares"]
    # one forged seed share: the rebuilt seed fails its commitment, another subset of shares passes
    answers = {d: a.s[d].unmask(a.request(d, survivors)) for d in devs if d != receiver}
    liar = devs[4]
    victim = next(p for p in answers[liar]["seed_shares"] if p != liar)
    forged = lambda: os.urandom(shamir.SHARE_BYTES - 1).rjust(shamir.SHARE_BYTES, b"\0")  # noqa: E731
    answers[liar]["seed_shares"][victim] = forged()
    w, total = server.unmask(a.ctx, a.enc, a.g, a.t, a.adverts, a.commitments, a.held, a.masked, answers)
    assert np.abs(total / w - fedavg(a.updates, a.weights, devs)).max() <= a.enc.mean_error_bound(len(devs), w)
    # when every subset holds a forged share, the seed cannot be rebuilt: named, and the attempt restarts
    for holder in answers.values():
        if victim in holder["seed_shares"]:
            holder["seed_shares"][victim] = forged()
    with pytest.raises(SecAggError) as e:
        server.unmask(a.ctx, a.enc, a.g, a.t, a.adverts, a.commitments, a.held, a.masked, answers)
    assert e.value.reason == Reason.BAD_SHARES


def test_a_device_refuses_inconsistent_unmasking_requests():
    a = Attempt(n=6).share_all()
    devs = sorted(a.ids)
    d = devs[0]
    req = a.request(d, set(a.ids))
    with pytest.raises(SecAggError) as e:  # one neighbour listed as both survived and dropped
        a.s[d].unmask(dict(req, dropped=req["survivors"][:1]))
    assert e.value.reason == Reason.INCONSISTENT
    with pytest.raises(SecAggError) as e:  # without its neighbours' signatures on the list it signed
        a.s[d].unmask(dict(req, signatures={}))
    assert e.value.reason == Reason.INCONSISTENT
    forged = {p: crypto.sign(crypto.identity_key(), b"x") for p in req["signatures"]}
    with pytest.raises(SecAggError) as e:  # signatures that are not its neighbours'
        a.s[d].unmask(dict(req, signatures=forged))
    assert e.value.reason == Reason.INCONSISTENT and (devs[1], Reason.BAD_SIGNATURE) in a.s[d].refused
    assert not a.s[d].revealed
    # a server that shrinks "the survivors" to one device, to unmask it alone: no device signs that
    with pytest.raises(SecAggError) as e:
        a.s[d].sign_survivors({"survivors": [d]})
    assert e.value.reason == Reason.INCONSISTENT
    # nor can it sell two devices' list to a third: it must contain the signer
    with pytest.raises(SecAggError) as e:
        a.s[d].sign_survivors({"survivors": devs[1:3]})
    assert e.value.reason == Reason.INCONSISTENT
    # and the unmasking checks the survivors it is asked about against the list it signed
    a.s[d].sign_survivors({"survivors": devs[:3]})
    with pytest.raises(SecAggError) as e:
        a.s[d].unmask(req)
    assert e.value.reason == Reason.INCONSISTENT


def test_the_server_takes_only_the_survivors_own_signatures_on_the_list():
    a = Attempt(n=5).share_all()
    devs = sorted(a.ids)
    survivors = sorted(devs)
    good = a.s[devs[0]].sign_survivors({"survivors": survivors})
    assert server.check_consistency(a.ctx, good, devs[0], survivors, a.public[devs[0]]) == {"sig": good["sig"]}
    for bad, reason in ((dict(good, sig=crypto.sign(a.ids[devs[1]], b"x")), Reason.BAD_SIGNATURE),
                        (dict(good, sig=b"short"), Reason.MALFORMED)):
        with pytest.raises(SecAggError) as e:
            server.check_consistency(a.ctx, bad, devs[0], survivors, a.public[devs[0]])
        assert e.value.reason == reason
    with pytest.raises(SecAggError) as e:  # signed for another list
        server.check_consistency(a.ctx, good, devs[0], survivors[:4], a.public[devs[0]])
    assert e.value.reason == Reason.BAD_SIGNATURE


def test_a_device_that_ignores_its_clip_is_stopped_only_at_the_edge_of_the_sum_check():
    """What masking leaves the server: it sees no update, so one device past its clip moves the mean
    until the sum itself is out of range (the bound docs/secure-aggregation.md states)."""
    a = Attempt(n=10).share_all()
    devs = sorted(a.ids)
    evil, honest = devs[0], devs[1:]
    survivors = set(devs)
    u = np.zeros_like(a.updates[evil])
    u[0] = 1.0
    clip, w_max = a.enc.clip, a.enc.max_weight
    w = sum(a.weights[d] for d in honest) + w_max
    honest_sum = sum(a.weights[d] * a.updates[d] for d in honest)

    def attempt_with(x):
        session = a.s[evil]
        session.encoding = fixed_point.Unchecked(**a.enc.as_dict())
        masked = dict(a.masked, **{evil: session.masked_input(a.inboxes[evil], x, w_max)})
        session.revealed = False
        answers = {d: a.s[d].unmask(a.request(d, survivors)) for d in devs}
        for s in a.s.values():
            s.revealed = False
        return server.unmask(a.ctx, a.enc, a.g, a.t, a.adverts, a.commitments, a.held, masked, answers)

    # the largest push along u the sum check lets through: ‖honest + w_max·r·u‖ = Σw·clip
    b = float(honest_sum @ u)
    r = (-b + np.sqrt(b * b - (honest_sum @ honest_sum - (w * clip) ** 2))) / w_max * 0.999
    weight_sum, total = attempt_with(r * u)
    shift = float((total / weight_sum - honest_sum / (w - w_max)) @ u)
    clipped_shift = w_max * clip / w  # the most a device clipped by the server could move the mean
    assert shift > 3 * clipped_shift and r > 3 * clip  # 0.97 against 0.16, an update 6× its clip (10 devices)
    with pytest.raises(SecAggError) as e:  # a little further and the sum gives it away
        attempt_with(1.2 * r * u)
    assert e.value.reason == Reason.OUT_OF_RANGE


# --- the Redis coordinator (fakeredis here; the real services in tests/integration) -----------------

def test_the_coordinator_moves_on_at_deadlines_restarts_below_the_minimum_and_unmasks(tmp_path):
    import fakeredis

    from fleettune.shared import keys
    from fleettune.shared.secagg.config import SecureAggregation
    from fleettune.shared.secagg.coordinator import SecureRounds
    from fleettune.shared.storage import LocalObjectStore

    r, now = fakeredis.FakeRedis(), [1000.0]
    store = LocalObjectStore(tmp_path)
    rounds = SecureRounds(r, store, clock=lambda: now[0])
    setting = SecureAggregation(stage_timeout_s=10, min_survivors=3, max_attempts=2)
    ids, updates, weights = cohort(5, d=40, seed=6)
    devs = sorted(ids)
    r.sadd(keys.round_cohort("f", 1), *devs)
    for d in devs:
        assert rounds.register_identity("f", d, crypto.identity_public(ids[d]))
    assert not rounds.register_identity("f", devs[0], crypto.identity_public(crypto.identity_key()))
    rounds.configure("f", 1, 1.0, 32, 41)
    rounds.ensure("f", 1, setting)

    def play(attempt: int, present: list[str], until: str) -> dict[str, DeviceSession]:
        """The devices in `present` answer each stage up to `until`; the clock passes each deadline."""
        sessions = {d: DeviceSession(Context("f", 1, attempt), d, ids[d], fixed_point.choose(5, 1.0, 32), 0, 3)
                    for d in present}
        for stage in ("advertise", "share", "masked", "consistency", "unmask"):
            for d, s in sessions.items():
                given = rounds.stage_for("f", 1, d, setting)
                assert given["stage"] == stage and given["attempt"] == attempt, (given, rounds.summary("f", 1))
                if given["input"] is None:
                    continue
                if stage == "advertise":
                    msg = s.advertise()
                elif stage == "share":
                    msg = s.share(given["input"])
                elif stage == "masked":
                    s.encoding = fixed_point.Encoding(**given["input"]["encoding"])
                    y = s.masked_input(given["input"]["inbox"], updates[d], weights[d]).astype("<u4").tobytes()
                    key, size, _ = rounds.masked_slot("f", 1, d)
                    assert size == len(y)
                    store.put(key, y)
                    msg = {"sha256": __import__("hashlib").sha256(y).hexdigest()}
                elif stage == "consistency":
                    msg = s.sign_survivors(given["input"])
                else:
                    msg = s.unmask(given["input"])
                rounds.receive("f", 1, d, stage, pack(dict(msg, attempt=attempt)), setting)
            if stage == until:
                return sessions
            if stage == "advertise" and len(present) < len(devs):
                now[0] += 11  # advertising waits for the absent device until its deadline; the rest wait
                # only for those that answered the stage before
        return sessions

    # attempt 1: only two devices show up; the advertise stage's deadline passes, and two is below three
    play(1, devs[:2], "advertise")
    now[0] += 11
    assert rounds.stage_for("f", 1, devs[0], setting)["attempt"] == 2
    with pytest.raises(SecAggError) as e:  # a straggler's keys for the attempt that ended
        rounds.receive("f", 1, devs[4], "advertise", pack(dict(DeviceSession(
            Context("f", 1, 1), devs[4], ids[devs[4]], fixed_point.choose(5, 1.0, 32), 0).advertise(), attempt=1)),
            setting)
    assert e.value.reason == Reason.STAGE_CLOSED
    # attempt 2: four of five; advertising waits for the fifth until its deadline, then it moves on
    sessions = play(2, devs[:4], "unmask")
    with pytest.raises(SecAggError) as e:
        rounds.receive("f", 1, devs[0], "unmask", pack({"attempt": 2, "device": devs[0], "seed_shares": {},
                                                         "key_shares": {}}), setting)
    assert e.value.reason in (Reason.STAGE_CLOSED, Reason.DUPLICATE_STAGE)
    total = rounds.unmask("f", 1, setting, 1 << 20)
    assert total is not None and total.survivors == devs[:4] and total.attempt == 2
    exact = fedavg(updates, weights, devs[:4])
    assert np.abs(total.total / total.weight_sum - exact).max() <= total.bound
    assert rounds.summary("f", 1)["stage"] == "ready"
    assert int(r.hget(keys.fed_stats("f"), "secagg_refused:stage_closed")) >= 1
    assert len(sessions) == 4


def test_distributed_dp_the_devices_noise_reaches_the_central_level_and_the_server_tops_up_the_rest():
    import torch

    from fleettune.shared.strategies.combine import RoundAggregator
    from fleettune.shared.strategies.config import AggregationConfig

    n, d, z, clip = 12, 20_000, 1.0, 1.0
    ids, updates, _ = cohort(n, d=d, seed=7)
    zeros = {k: np.zeros(d) for k in ids}
    expected = 8  # the survivors the noise is sized for
    enc = fixed_point.choose(n, clip, 1, noise_std=z * clip / np.sqrt(expected))
    res = simulation.run(zeros, dict.fromkeys(ids, 1), enc, ids)
    # the sum of n devices' shares: N(0, n/expected · (z·C)²) per coordinate, at or above the central level
    assert abs(float(np.std(res.total)) / (z * clip * np.sqrt(n / expected)) - 1) < 0.03
    # each masked upload hides an update plus its noise; the sum check allows exactly that noise
    res = simulation.run(updates, dict.fromkeys(ids, 1), enc, ids)
    assert abs(float(np.std(res.total - sum(updates.values()))) / np.sqrt(n / expected) - 1) < 0.03
    # the server adds only what the survivors' noise lacks
    shapes = {"w": (4,)}
    for device_std, server_std in ((1.2, 0.0), (0.6, np.sqrt(1 - 0.36))):
        agg = RoundAggregator(AggregationConfig(dp_noise_multiplier=z), {"w": torch.zeros(4)}, shapes, rank=8)
        agg.add_sum({"w": torch.zeros(4)}, 4.0, 4)
        agg.device_noise_std = device_std
        fields = agg.finish(1.0, {}, clip_bound=clip, noise_seed=1).fields
        assert fields["dp_server_noise_std_on_sum"] == pytest.approx(server_std)
        assert fields["dp_noise_std_on_sum"] == pytest.approx(max(1.0, device_std))


def test_a_device_revoked_mid_attempt_is_named_and_left_out_of_its_neighbours_offers():
    a = Attempt(n=6)
    devs = sorted(a.ids)
    gone = devs[1]
    public = {d: k for d, k in a.public.items() if d != gone}
    offer = server.offer_for(devs[0], a.g, a.t, a.adverts, public)
    assert gone not in offer["neighbours"] and len(offer["neighbours"]) == len(devs) - 2
    msg = a.s[gone].share(a.offer(gone))
    with pytest.raises(SecAggError) as e:
        server.check_shares(a.ctx, msg, gone, a.g, a.adverts, public)
    assert e.value.reason == Reason.UNKNOWN_IDENTITY
