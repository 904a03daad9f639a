"""Every stage of SecAgg+ in one process, with dropouts at any stage: the reference for tests and the
bench. It runs the same device and server functions the pipeline runs, and keeps a transcript of
everything the server receives.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import numpy as np

from fleettune.shared.secagg import graph as graphs
from fleettune.shared.secagg import primitives as crypto
from fleettune.shared.secagg import server
from fleettune.shared.secagg.device import DeviceSession
from fleettune.shared.secagg.fixed_point import Encoding
from fleettune.shared.secagg.messages import Context, SecAggError, pack

STAGES = ("advertise", "share", "masked", "consistency", "unmask")
Drops = Callable[[int, str], set[str]]  # (attempt, stage) -> devices that vanish before sending it


@dataclasses.dataclass
class Result:
    weight_sum: float
    total: np.ndarray  # Σ w·x over the survivors
    survivors: list[str]
    attempts: int
    bound: float  # per-coordinate bound on |mean − exact mean| from the rounding
    transcript: list[tuple[str, str, bytes]]  # (stage, device, bytes the server received)
    device_seconds: dict[str, float]  # CPU seconds per device, all stages
    server_seconds: float
    bytes_up: dict[str, int]
    bytes_down: dict[str, int]
    degree: int = 0
    threshold: int = 0

    @property
    def mean(self) -> np.ndarray:
        return self.total / self.weight_sum


def run(updates: dict[str, np.ndarray], weights: dict[str, int], encoding: Encoding, identities: dict[str, bytes],
        *, federation: str = "sim", round_no: int = 1, degree: int | None = None, threshold: int | None = None,
        min_survivors: int = 2, drops: Drops = lambda attempt, stage: set(), max_attempts: int = 3,
        rng: np.random.Generator | None = None) -> Result:
    """SecAgg+ over `updates`, restarting with fresh keys (up to `max_attempts`) when too few survive."""
    rng = rng or np.random.default_rng()
    public = {d: crypto.identity_public(k) for d, k in identities.items()}
    transcript: list[tuple[str, str, bytes]] = []
    dev_s = dict.fromkeys(updates, 0.0)
    up, down = dict.fromkeys(updates, 0), dict.fromkeys(updates, 0)
    server_s = [0.0]
    last: Exception | None = None

    def timed(fn, *args):
        t0 = time.process_time()
        try:
            return fn(*args)
        finally:
            server_s[0] += time.process_time() - t0

    for attempt in range(1, max_attempts + 1):
        ctx = Context(federation, round_no, attempt)
        sessions: dict[str, DeviceSession] = {}

        def exchange(stage: str, d: str, sent: int, step, *args):
            """The server sends `sent` bytes, the device answers with step(*args); its answer as the
            server receives it (in the transcript), or None when the device sits the attempt out."""
            down[d] += sent
            t0 = time.process_time()
            try:
                answer = step(*args)
            except SecAggError:
                return None
            finally:
                dev_s[d] += time.process_time() - t0
            raw = answer.tobytes() if isinstance(answer, np.ndarray) else pack(answer)
            transcript.append((stage, d, raw))
            up[d] += len(raw)
            return answer

        live = set(updates) - drops(attempt, "advertise")
        adverts = {}
        for d in sorted(live):
            sessions[d] = DeviceSession(ctx, d, identities[d], encoding, threshold or 0, min_survivors)
            msg = exchange("advertise", d, 0, sessions[d].advertise)
            adverts[d] = timed(server.check_advert, ctx, msg, d, updates, public)
        if len(adverts) < max(min_survivors, 2):
            last = SecAggError(server.Reason.TOO_FEW_SHARES, f"{len(adverts)} devices advertised keys")
            continue
        g = timed(graphs.build, adverts, os.urandom(32), degree)  # over those that advertised: a secret-seeded draw
        t = threshold or graphs.default_threshold(g.degree)
        shared = {}
        for d in sorted(set(adverts) - drops(attempt, "share")):
            offer = timed(server.offer_for, d, g, t, adverts, public)
            if (msg := exchange("share", d, len(pack(offer)), sessions[d].share, offer)) is not None:
                shared[d] = timed(server.check_shares, ctx, msg, d, g, adverts, public)
        inboxes = timed(server.relay, shared)
        held = {d: set(box) for d, box in inboxes.items()}
        masked = {}
        for d in sorted(set(shared) - drops(attempt, "masked")):
            inbox = inboxes[d]
            y = exchange("masked", d, sum(map(len, inbox.values())), sessions[d].masked_input, inbox, updates[d],
                         weights[d], rng)
            if y is not None:
                masked[d] = timed(server.check_masked, y, d, shared, encoding, y.shape[0])
        survivors = set(masked)
        signatures = {}
        for d in sorted(survivors - drops(attempt, "consistency")):
            request = {"survivors": sorted(survivors)}
            if (msg := exchange("consistency", d, len(pack(request)), sessions[d].sign_survivors, request)) is not None:
                signatures[d] = timed(server.check_consistency, ctx, msg, d, sorted(survivors), public[d])["sig"]
        answers = {}
        for d in sorted(set(signatures) - drops(attempt, "unmask")):
            theirs = {p: signatures[p] for p in g.neighbours(d) if p in signatures}
            request = timed(server.unmask_request, held[d], survivors, theirs)
            if (msg := exchange("unmask", d, len(pack(request)), sessions[d].unmask, request)) is not None:
                answers[d] = timed(server.check_unmask, msg, d, held[d], survivors, signatures)
        try:
            if len(survivors) < min_survivors:
                raise SecAggError(server.Reason.TOO_FEW_SHARES, f"{len(survivors)} survivors, {min_survivors} needed")
            commitments = {d: m["commitment"] for d, m in shared.items()}
            weight_sum, total = timed(server.unmask, ctx, encoding, g, t, adverts, commitments, held, masked, answers)
        except SecAggError as exc:
            last = exc
            continue
        bound = encoding.mean_error_bound(len(survivors), weight_sum)
        return Result(weight_sum, total, sorted(survivors), attempt, bound, transcript, dev_s, server_s[0], up, down,
                      g.degree, t)
    raise SecAggError(server.Reason.TOO_FEW_SHARES, f"no attempt of {max_attempts} completed: {last}")

