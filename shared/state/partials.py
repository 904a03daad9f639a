"""Which accepted updates are folded into which committed partial sum, exactly once.

An accept adds the device to the round's `unfolded` set and its sample count to `claims`. A
worker commits a partial (an object it wrote) in one script that also removes the partial's new
members from `unfolded`, and only while the round is open: once a close has moved the round to
closing, the committed partials and `unfolded` are frozen and disjoint, so every accepted update
is in exactly one partial or read by the close itself.
"""

from __future__ import annotations

import msgpack

from fleettune.shared import keys
from fleettune.shared.state.accounting import UpdateRecord
from fleettune.shared.state.base import StateBase
from fleettune.shared.state.lua import load_script

COMMITTED, REFUSED, ALREADY = 1, 0, 2

_COMMIT = load_script("commit_partial")  # KEYS, ARGV and replies: lua/commit_partial.lua


class Partials(StateBase):
    _commit_script = None

    def commit_partial(self, fed: str, round_no: int, slot: str, entry: dict, members: list[str]) -> int:
        """COMMITTED, ALREADY (this very entry was committed before) or REFUSED (the round left
        open). Raises if a member is already folded elsewhere: that is a bug, never a retry."""
        if self._commit_script is None:
            self._commit_script = self.r.register_script(_COMMIT)
        result = int(self._commit_script(
            keys=[keys.round_info(fed, round_no), keys.round_partials(fed, round_no),
                  keys.round_unfolded(fed, round_no)],
            args=[slot, msgpack.packb(entry, use_bin_type=True), *members]))
        if result < 0:
            raise RuntimeError(f"{fed} round {round_no}: a member of partial {slot} is already folded")
        return result

    def partial_entries(self, fed: str, round_no: int) -> dict[str, dict]:
        raw = self.r.hgetall(keys.round_partials(fed, round_no))
        return {k.decode(): msgpack.unpackb(v, raw=False) for k, v in sorted(raw.items())}

    def unfolded(self, fed: str, round_no: int) -> list[str]:
        return sorted(m.decode() for m in self.r.smembers(keys.round_unfolded(fed, round_no)))

    def records(self, fed: str, round_no: int, devices: list[str]) -> dict[str, UpdateRecord]:
        if not devices:
            return {}
        values = self.r.hmget(keys.round_updates(fed, round_no), devices)
        return {d: UpdateRecord.from_bytes(v) for d, v in zip(devices, values) if v is not None}

    def median_claim(self, fed: str, round_no: int) -> float | None:
        """The median accepted sample count (the mean of the middle two for an even count), in
        O(log N): the claims are a sorted set."""
        key = keys.round_claims(fed, round_no)
        n = int(self.r.zcard(key))
        if n == 0:
            return None
        lo = self.r.zrange(key, (n - 1) // 2, (n - 1) // 2, withscores=True)[0][1]
        hi = self.r.zrange(key, n // 2, n // 2, withscores=True)[0][1]
        return (lo + hi) / 2

    def uncapped(self, fed: str, round_no: int) -> list[str]:
        """Devices accepted before the round's weight cap was known (a first round's first few)."""
        return sorted(m.decode() for m in self.r.smembers(keys.round_uncapped(fed, round_no)))

    def contributors(self, fed: str, round_no: int) -> list[str]:
        return sorted(k.decode() for k in self.r.hkeys(keys.round_updates(fed, round_no)))
