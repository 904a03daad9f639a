"""Federation and round state in Redis, one class per concern, composed into FederationState.

    Registry       federations, configs by revision, devices, status, counters, heartbeats
    RoundMachine   open, join, close under a lease, settle and open the next round
    Accounting     each message's one outcome, counters and dead letters
    Evaluations    version evaluations and the forgetting guard, once per version
    Partials       which accepted updates are in which committed partial sum, exactly once
"""

from fleettune.shared.state.accounting import ACCEPTED, REDELIVERED, Accounting, UpdateRecord
from fleettune.shared.state.evaluations import Evaluations
from fleettune.shared.state.partials import Partials
from fleettune.shared.state.federations import Registry
from fleettune.shared.state.round_machine import RoundInfo, RoundMachine

__all__ = ["ACCEPTED", "REDELIVERED", "FederationState", "RoundInfo", "UpdateRecord"]


class FederationState(Registry, RoundMachine, Accounting, Evaluations, Partials):
    """All reads and writes of federation state; the Redis client is passed in (real or fake)."""
