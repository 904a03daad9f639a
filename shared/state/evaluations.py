"""Version evaluations and the forgetting guard's action, recorded once per version."""

from __future__ import annotations

import json

from fleettune.shared import keys
from fleettune.shared.state.base import StateBase


class Evaluations(StateBase):
    def record_evaluation(self, fed: str, version: int, result: dict, guard: tuple[str, str] | None = None,
                          lr: float | None = None) -> bool:
        """Record a version's evaluation and act on its forgetting guard, once, in one transaction.

        `guard` is (action, message): "halt" stops the federation and fails its open round;
        "lower_lr" sets the server learning rate to `lr`. False when the version had been recorded
        already (a redelivered or concurrent evaluation), and then nothing is changed.
        """
        evals = keys.fed_evaluations(fed)

        def record(pipe) -> bool:
            if pipe.hexists(evals, str(version)):
                pipe.multi()
                pipe.zrem(keys.EVALUATIONS_DUE, f"{fed}:{version}")
                return False
            round_no = int(pipe.hget(keys.fed_state(fed), "round") or 0)
            round_open = bool(round_no) and pipe.hget(keys.round_info(fed, round_no), "status") == b"open"
            pipe.multi()
            pipe.hset(evals, str(version), json.dumps(result, sort_keys=True))
            pipe.zrem(keys.EVALUATIONS_DUE, f"{fed}:{version}")
            if guard is not None:
                action, message = guard
                if action == "halt":
                    pipe.hset(keys.fed_state(fed), mapping={"status": "halted", "reason": message})
                    if round_open:
                        pipe.hset(keys.round_info(fed, round_no), mapping={"status": "failed", "reason": "halted"})
                else:
                    pipe.hset(keys.fed_state(fed), "server_lr", repr(lr))
                if round_no:
                    pipe.hset(keys.round_info(fed, round_no), "guard", message)
            return True

        return self._transaction(record, evals, keys.fed_state(fed))

    def evaluation(self, fed: str, version: int) -> dict | None:
        raw = self.r.hget(keys.fed_evaluations(fed), str(version))
        return json.loads(raw) if raw is not None else None

    def latest_evaluation(self, fed: str) -> dict | None:
        """The evaluation of the newest evaluated version (the one with general perplexity, if any)."""
        raw = self.r.hgetall(keys.fed_evaluations(fed))
        if not raw:
            return None
        return json.loads(raw[max(raw, key=int)])

    def evaluations_due(self, before: float, limit: int = 100) -> list[tuple[str, int]]:
        """(federation, version) published before `before` and not evaluated yet."""
        out = []
        for member in self.r.zrangebyscore(keys.EVALUATIONS_DUE, "-inf", before, start=0, num=limit):
            fed, _, version = member.decode().rpartition(":")
            out.append((fed, int(version)))
        return out
