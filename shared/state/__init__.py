"""Federation and round state in Redis, in five parts that callers name: `state.rounds.open_round(…)`.

    federations   configs by revision, enrolled devices, status, counters, starts, heartbeats
    rounds        open, join, close under a lease, settle and open the next round
    accounting    each message's one outcome, counters and dead letters
    evaluations   version evaluations and the forgetting guard, once per version
    partials      which accepted updates are in which committed partial sum, exactly once

Beside them: the gateway's ledger of received messages (ledger.py), leases (lease.py), what the
broker holds (broker.py) and the Lua runner (lua.py).
"""

from __future__ import annotations

import redis

from fleettune.shared import keys
from fleettune.shared.state.accounting import ACCEPTED, REDELIVERED, Accounting, UpdateRecord
from fleettune.shared.state.evaluations import Evaluations
from fleettune.shared.state.federations import Federations
from fleettune.shared.state.partials import Partials
from fleettune.shared.state.round_machine import RoundInfo, RoundMachine

__all__ = ["ACCEPTED", "REDELIVERED", "FederationState", "RoundInfo", "UpdateRecord"]


class FederationState:
    """The five parts over one Redis client (real or fake); a caller names the part it needs."""

    def __init__(self, client: redis.Redis, deadletter_maxlen: int = 100_000, retention_s: float = 7 * 86400,
                 message_ttl_s: int = keys.MESSAGE_TTL_S) -> None:
        self.r = client
        self.retention_s = retention_s
        limits = {"deadletter_maxlen": deadletter_maxlen, "retention_s": retention_s, "message_ttl_s": message_ttl_s}
        self.federations = Federations(client, **limits)
        self.rounds = RoundMachine(client, self.federations, **limits)
        self.accounting = Accounting(client, **limits)
        self.evaluations = Evaluations(client, **limits)
        self.partials = Partials(client, **limits)
