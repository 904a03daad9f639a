"""Retention: a round's update objects, partial sums and per-round Redis sets go once its retention
has passed (`Settings.retention_s` after the round ended, that is after its version published).

Published versions (federations/{fed}/versions/...) are kept. A round's small info hash, and the
evaluation of the version it published, stay for `history` more rounds: they go when the round
`history` rounds later is pruned, so Redis stays flat however many rounds a federation runs.
The sweep calls `prune` every interval; a round is removed from the schedule only after its
objects and keys are gone, so an outage in the middle is finished by a later sweep.
"""

from __future__ import annotations

from fleettune.shared import keys
from fleettune.shared.state import FederationState
from fleettune.shared.storage import ObjectStore

SECAGG_STAGES = ("advertise", "share", "inbox", "masked", "consistency", "unmask")  # the per-attempt hashes of a secure round


def prune(state: FederationState, store: ObjectStore, now: float, limit: int = 50,
          history: int = 1000) -> tuple[int, int]:
    """Delete what is due; returns (rounds pruned, objects deleted)."""
    rounds = objects = 0
    for member in state.r.zrangebyscore(keys.RETENTION, "-inf", now, start=0, num=limit):
        fed, _, round_text = member.decode().rpartition(":")
        round_no = int(round_text)
        objects += store.delete_prefix(keys.round_updates_prefix(fed, round_no))
        objects += store.delete_prefix(keys.round_partials_prefix(fed, round_no))
        objects += store.delete_prefix(keys.secagg_masked_prefix(fed, round_no))
        attempts = int(state.r.hget(keys.secagg(fed, round_no), "attempt") or 0)
        past = round_no - history
        version = state.r.hget(keys.round_info(fed, past), "version") if past > 0 else None
        with state.r.pipeline() as pipe:
            if past > 0:
                pipe.delete(keys.round_info(fed, past))
            if version is not None:
                pipe.hdel(keys.fed_evaluations(fed), version)
            pipe.delete(keys.round_updates(fed, round_no), keys.round_cohort(fed, round_no),
                        keys.round_reported(fed, round_no), keys.round_inflight(fed, round_no),
                        keys.round_claims(fed, round_no), keys.round_unfolded(fed, round_no),
                        keys.round_uncapped(fed, round_no),
                        keys.round_partials(fed, round_no), keys.secagg(fed, round_no),
                        *(keys.secagg_stage(fed, round_no, a, stage) for a in range(1, attempts + 1)
                          for stage in SECAGG_STAGES))
            pipe.zrem(keys.RETENTION, member)
            pipe.execute()
        rounds += 1
    return rounds, objects
