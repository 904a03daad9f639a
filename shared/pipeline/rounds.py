"""Round lifecycle: start a federation, open rounds, decide when one closes, close it under a lease.

The close itself is three steps: load what the round builds on (round_inputs.BaseVersion), read
its updates into the aggregation (round_inputs.RoundReader), publish the next version. Evaluation
and the forgetting guard are in evaluation.py (the interpolate guard runs here, before the publish),
the DP accounting in strategies/privacy.py.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from collections.abc import Callable, Iterable

import numpy as np
import torch

from fleettune.shared.protocol import versions
from fleettune.shared.protocol.adapter_spec import initial_weights
from fleettune.shared.strategies.fedavg import update_norm
from fleettune.shared.errors import ObjectNotFound, StateError
from fleettune.shared.federation import DeviceProfile, FederationConfig
from fleettune.shared.pipeline.evaluation import Evaluator, interpolate_toward_base, toward_base
from fleettune.shared.pipeline.round_inputs import BaseVersion, RoundInputs, RoundReader
from fleettune.shared.secagg.coordinator import SecureRounds
from fleettune.shared.settings import Settings
from fleettune.shared.state import FederationState, RoundInfo
from fleettune.shared.storage import ObjectStore
from fleettune.shared.strategies import privacy
from fleettune.shared.strategies.combine import RoundAggregator
from fleettune.shared.strategies.partial import UpdateStats

# decide(): what an open round should do now
WAIT, CLOSING, FAILED = "wait", "closing", "failed"
# what a close call did: closed (published a version) or failed the round now; waits; found another
# close holding the round's lease (busy); or found it ended earlier (settled, after any repair)
CLOSED, BUSY, SETTLED = "closed", "busy", "settled"
UNREADABLE = "quorum_unreadable"  # accepted updates vanished or changed below the quorum
PRIVACY_BUDGET = "privacy_budget_exhausted"  # why a DP federation completed early
LEASE_MARGIN_S = 30  # a close's lease: the task time limit plus this


def decide(info: RoundInfo, n_updates: int, min_updates: int, now: float, reported: int | None = None,
           grace: float = 0.0) -> str:
    """Close with quorum once everyone reported or the deadline passed; fail without it then.

    An async buffer closes once it holds `buffer_size` updates, or at its deadline (its maximum
    age) with a quorum; without one it waits on: failing it would drop the updates it holds.

    `reported` counts selected devices with a final outcome, accepted or rejected (default: the
    accepted ones): once all have one, nothing more can arrive, so waiting longer is pointless.
    Deadlines are judged by receive time: past the deadline, messages the gateway took on time and
    that have no outcome yet (`info.inflight`, say a worker died holding them) are waited for, for
    at most `grace` seconds.
    """
    reported = n_updates if reported is None else reported
    quorum = n_updates >= min_updates
    if info.mode == "async":  # a buffer: publish when full, or when old with a quorum; never fail
        if n_updates >= max(info.buffer_size, 1) or (quorum and now >= info.deadline):
            return CLOSING
        return WAIT
    everyone = info.cohort_size > 0 and reported >= info.cohort_size
    expired = now >= info.deadline and not (info.inflight > 0 and now < info.deadline + grace)
    if quorum and (everyone or expired):
        return CLOSING
    if expired or everyone:
        return FAILED
    return WAIT


@dataclasses.dataclass(frozen=True)
class CloseResult:
    decision: str  # closed | failed | wait | busy | settled
    version: int | None = None
    next_round: RoundInfo | None = None
    manifest: dict | None = None
    info: RoundInfo | None = None  # the round as it was when the close began
    updates: int = 0  # accepted updates in the round
    aggregation_seconds: float = 0.0
    reason: str = ""  # why a round failed


class RoundCoordinator:
    def __init__(self, state: FederationState, store: ObjectStore, settings: Settings,
                 clock: Callable[[], float] = time.time,
                 evaluator_for: Callable[[FederationConfig], Evaluator] | None = None) -> None:
        self.state = state
        self.store = store
        self.settings = settings
        self.clock = clock
        self.evaluator_for = evaluator_for  # the interpolate forgetting guard's; Runtime passes its own
        self.reader = RoundReader(state, store, settings)
        self.secure = SecureRounds(state.r, store, clock)

    def start(self, config: FederationConfig, devices: Iterable[str | DeviceProfile]) -> tuple[RoundInfo, list[str]]:
        """Create the federation, publish version 0 and open round 1; also returns refused devices."""
        refused = self.state.federations.create(config, devices)
        return self.begin_training(config.name, config.policy.max_rounds), refused

    def begin_training(self, fed: str, rounds: int) -> RoundInfo:
        """Open the next round of `fed` and allow `rounds` rounds from it (a training session)."""
        config = self.state.federations.config(fed)
        if config is None:
            raise StateError(f"unknown federation {fed!r}")
        status = self.state.federations.status(fed)
        round_no, version = int(status.get("round", 0)), int(status.get("version", 0))
        if round_no == 0:
            self._publish_initial(config, 0, parent=None)
        self.state.federations.set_status(fed, "active", last_round=round_no + rounds)
        info = self._open(config, round_no + 1, version)
        if info is None:
            raise StateError(f"{fed} round {round_no + 1} was opened by someone else")
        return info

    def start_requested(self, fed: str) -> RoundInfo | None:
        """Do the start the API recorded (State.request_start): publish v0 if the federation never
        trained, open its next round. Idempotent: a start already done, or overtaken by a stop, is
        only cleared; two workers racing here open the round once."""
        request = self.state.federations.start_request(fed)
        if request is None:
            self.state.federations.start_done(fed)  # the federation was deleted, or another worker finished
            return None
        first, rounds = request
        status = self.state.federations.status(fed)
        if status.get("status") != "active" or int(status.get("round", 0)) >= first:
            self.state.federations.start_done(fed)
            return None
        try:
            info = self.begin_training(fed, rounds)
        except StateError:
            if self.state.federations.current_round(fed) < first:
                raise
            info = self.state.rounds.round_info(fed, first)  # opened by the worker we raced
        self.state.federations.start_done(fed)
        return info

    def _publish_initial(self, config: FederationConfig, version: int, parent: int | None) -> None:
        """A fresh adapter (as PEFT initialises one) as `version`: the start, or a change of shape
        (which keeps the DP ledger: the data spent before still counts)."""
        weights = initial_weights(config.spec, config.seed)
        ledger = privacy.ledger_of(versions.manifest(self.store, config.name, parent)) if parent is not None else ()
        tiers = {rank: ({k: weights[k][tuple(slice(0, n) for n in shape)].contiguous()
                         for k, shape in config.spec_for(rank).tensors.items()}, config.spec_for(rank))
                 for rank in set(config.tier_ranks.values())}  # each tier: the leading slice (B is zero)
        versions.publish(self.store, config.name, version, weights, config.spec, {
            "round": 0 if parent is None else None, "parent_version": parent, "contributors": [],
            "total_samples": 0, "global_norm": update_norm(weights), "config_revision": config.revision,
            "reinitialized": parent is not None,
            **({"dp": {"ledger": [list(x) for x in ledger], "releases": sum(n for _, _, n in ledger)}} if ledger else {}),
        }, tiers=tiers)

    def _open(self, config: FederationConfig, round_no: int, base_version: int) -> RoundInfo | None:
        """Open a round under the pending config if there is one."""
        pending = self.state.federations.pending_config(config.name)
        base_version = self._prepare_shape(config, pending, base_version)
        policy = (pending or config).policy
        return self.state.rounds.open_round(config.name, round_no, base_version, self.clock(), policy.timeout_seconds,
                                     config=pending)

    def _prepare_shape(self, config: FederationConfig, pending: FederationConfig | None, base_version: int) -> int:
        """The next round's base version: a pending change of adapter shape starts from a fresh one."""
        if pending is None or (pending.spec.tensors == config.spec.tensors and pending.tier_ranks == config.tier_ranks):
            return base_version
        self._publish_initial(pending, base_version + 1, parent=base_version)  # idempotent: same bytes
        return base_version + 1

    def close(self, fed: str, round_no: int, owner: str | None = None) -> CloseResult:
        """Close the round if it is due. Safe to call any number of times, from any worker.

        The close is a leased, resumable state machine: take the round (open -> closing, under a
        lease for `owner`), aggregate the readable updates, publish with conditional writes, then
        in one transaction mark the round closed, record the evaluation as due and open the next
        round. A close that died anywhere is redone by its redelivery (same owner) or, once its
        lease expires, by the sweep; a round that ended without its next round gets it here.
        """
        opened = self.state.rounds.round_info(fed, round_no)
        config = self.state.federations.config(fed, opened.config_rev if opened else None)
        if opened is None or config is None:
            raise StateError(f"{fed!r} has no round {round_no}")
        now = self.clock()
        if config.aggregation.secure_aggregation is not None and opened.status == "open":
            judge = self._secure_judge(config, round_no, now)
        else:
            def judge(i: RoundInfo, n: int, reported: int) -> str:
                return decide(i, n, config.policy.min_updates, now, reported, self.settings.deadline_grace_s)
        decision, info = self.state.rounds.begin_close(
            fed, round_no, judge, owner or uuid.uuid4().hex, now, self.settings.task_time_limit_s + LEASE_MARGIN_S)
        if decision in (WAIT, BUSY):
            return CloseResult(decision, info=info)
        if decision == SETTLED:  # a repair: the next round may never have been opened
            return CloseResult(SETTLED, info.version, self._advance(config, info, info.version), info=info)
        updates = self.state.rounds.update_count(fed, round_no)  # the records themselves are read once, below
        if decision == FAILED:
            return CloseResult(FAILED, None, self._advance(config, info, None), info=info, updates=updates,
                               reason="no_quorum")
        version = info.base_version + 1
        started = time.perf_counter()
        manifest = self._aggregate_and_publish(config, self.state.rounds.round_info(fed, round_no), version)
        seconds = time.perf_counter() - started
        if manifest is None:  # fewer readable, verified updates than the quorum: publish nothing
            return CloseResult(FAILED, None, self._advance(config, info, None, failure=UNREADABLE), info=info,
                               updates=updates, reason=UNREADABLE)
        exhausted = (manifest.get("dp") or {}).get("budget_exhausted", False)
        nxt = self._advance(config, info, version, evaluate=config.evaluation is not None,
                            complete=PRIVACY_BUDGET if exhausted else None, reference=manifest.get("median_claim"))
        return CloseResult(CLOSED, version, nxt, manifest, info=info, updates=updates, aggregation_seconds=seconds)

    def _secure_judge(self, config: FederationConfig, round_no: int, now: float):
        """`decide` for a secure round: its updates are the survivors of a completed unmasking, and
        everyone has reported once it completed or failed (nothing more can arrive then)."""
        setting = config.aggregation.secure_aggregation
        total = self.secure.unmask(config.name, round_no, setting, self.settings.max_update_bytes)
        attempt = self.secure.load(config.name, round_no)
        over = total is not None or (attempt is not None and attempt.stage == "failed")
        survivors = len(total.survivors) if total is not None else 0
        return lambda i, n, reported: decide(i, survivors, config.policy.min_updates, now,
                                             i.cohort_size if over else 0, self.settings.deadline_grace_s)

    def _secure_inputs(self, config: FederationConfig, info: RoundInfo, base: BaseVersion) -> RoundInputs | None:
        """The round's masked sum, unmasked, as the aggregator's one partial sum (None: not unmasked)."""
        total = self.secure.unmask(config.name, info.round, config.aggregation.secure_aggregation,
                                   self.settings.max_update_bytes)
        if total is None:
            return None
        aggregator = RoundAggregator(config.aggregation, base.weights, config.update_tensors, config.adapter.rank,
                                     config.adapter.alpha, base.tiers)
        sums, offset = {}, 0
        for name in sorted(config.update_tensors):  # the devices' flat order (the plan's "tensors")
            shape = config.update_tensors[name]
            size = math.prod(shape)
            sums[name] = torch.from_numpy(total.total[offset:offset + size].astype(np.float32)).reshape(shape)
            offset += size
        aggregator.add_sum(sums, total.weight_sum, len(total.survivors))
        aggregator.device_noise_std = total.device_noise_std
        fields = {"secure_aggregation": {"attempt": total.attempt, "survivors": len(total.survivors),
                                         "dropped_after_sharing": total.dropped, "modulus_bits": total.encoding.bits,
                                         "frac_bits": total.encoding.frac_bits, "mean_error_bound": total.bound}}
        # Σw is all a secure round knows of its samples: each device's count, capped at max_weight
        return RoundInputs(aggregator, total.survivors, {}, UpdateStats(samples=int(total.weight_sum)), None, fields)

    def _advance(self, config: FederationConfig, info: RoundInfo, version: int | None, failure: str | None = None,
                 evaluate: bool = False, complete: str | None = None,
                 reference: float | None = None) -> RoundInfo | None:
        """Settle the round and open the next one (or complete the federation), atomically.
        `reference`: the next round's reference claim (default: this round's)."""
        fed = config.name
        status = self.state.federations.status(fed)
        current = self.state.federations.config(fed) or config
        pending = self.state.federations.pending_config(fed)
        base = version if version is not None else info.base_version
        last_round = int(status.get("last_round", current.policy.max_rounds))
        if status.get("status") == "active" and int(status.get("round", 0)) == info.round < last_round:
            base = self._prepare_shape(current, pending, base)
        return self.state.rounds.settle_round(fed, info.round, self.clock(), base,
                                       (pending or current).policy.timeout_seconds, version=version,
                                       failure=failure, pending=pending, evaluate=evaluate, complete=complete,
                                       reference=reference if reference is not None else info.reference_claim)

    def _aggregate_and_publish(self, config: FederationConfig, info: RoundInfo, version: int) -> dict | None:
        """Load what the round builds on (once), aggregate its updates, publish the next version."""
        policy, agg = config.policy, config.aggregation
        try:
            published = versions.manifest(self.store, config.name, version)  # written last: the version is whole
        except ObjectNotFound:
            published = None
        if published is not None and (published.get("round"), published.get("parent_version")) == (
                info.round, info.base_version):
            # a redone close: this round's earlier attempt published it. Keep it rather than recompute
            # (an SVD on another thread count, or new noise, must never meet a refused overwrite)
            versions.point_forward(self.store, config.name, version)  # that attempt may have died before
            return published
        base = BaseVersion.load(self.state, self.store, self.settings, config, info)
        if config.aggregation.secure_aggregation is not None:
            inputs = self._secure_inputs(config, info, base)
            if inputs is None:
                return None
        else:
            inputs = self.reader.read(config, info, base)
        aggregator = inputs.aggregator
        if aggregator.count < policy.min_updates:
            return None  # quorum counts updates that can still be read and verified, not acceptances

        server_lr = info.server_lr or policy.server_lr  # as the guard had set it when the close began
        result = aggregator.finish(server_lr, base.optimizer_state, policy.max_update_norm, base.noise_seed,
                                   base.control, aggregator.count / max(base.population, aggregator.count))
        guarded = self._keep_general_text(config, result)
        manifest = {
            "round": info.round, "parent_version": info.base_version, "contributors": inputs.contributors,
            "excluded": inputs.excluded, **inputs.stats.manifest_fields(),
            "total_weight": aggregator.total_weight, "aggregation": {**result.fields, **inputs.fields},
            "mean_delta_norm": result.mean_delta_norm, "global_norm": update_norm(result.weights),
            # the manifest keeps the clip's published name (clients read it): RoundPolicy.max_update_norm
            "server_lr": server_lr, "max_grad_norm": policy.max_update_norm, "config_revision": config.revision,
            # the cap on sample weights this round applied, and the median claim the next round's derives from
            "weight_cap": inputs.cap, "median_claim": self.state.partials.median_claim(config.name, info.round),
        }
        if dp := privacy.manifest_fields(agg, policy.max_update_norm, base.dp_ledger):
            manifest["dp"] = dp
        if guarded:
            manifest["guard"] = guarded
        return versions.publish(self.store, config.name, version, result.weights, config.spec, manifest,
                                result.optimizer_state,
                                {rank: (w, config.spec_for(rank)) for rank, w in result.tiers.items()},
                                result.control)

    def _keep_general_text(self, config: FederationConfig, result) -> dict | None:
        """The interpolate forgetting guard: scale the round's adapter (and its tiers') toward the base
        until general text is within the bound, so no published version passes it. Post-processing
        of the aggregate: DP's guarantee is unchanged. None when the federation has not asked for it."""
        evaluation = config.evaluation
        if evaluation is None or evaluation.forgetting_action != "interpolate":
            return None
        if self.evaluator_for is None:  # a coordinator built without one must not publish unguarded
            raise StateError(f"{config.name}: the interpolate forgetting guard needs an evaluator in this process")
        scale, before, after = interpolate_toward_base(self.evaluator_for(config).general_ratio, result.weights,
                                                       evaluation.forgetting_threshold)
        if scale < 1.0:
            result.weights = toward_base(result.weights, scale)
            result.tiers = {rank: toward_base(w, scale) for rank, w in result.tiers.items()}
        return {"action": "interpolate", "scale": scale, "forgetting_ratio_unscaled": before,
                "forgetting_ratio": after, "threshold": evaluation.forgetting_threshold}

    def resume(self, fed: str) -> RoundInfo | None:
        """Reopen a halted or stopped federation for the rounds its session has left, here."""
        self.request_resume(fed)
        return self.start_requested(fed)

    def request_resume(self, fed: str) -> None:
        """Record the resume of a halted or stopped federation; a worker opens its round."""
        status = self.state.federations.status(fed)
        if status.get("status") not in ("halted", "stopped"):
            raise StateError(f"{fed} is {status.get('status')}, not halted or stopped")
        left = int(status.get("last_round", 0)) - int(status.get("round", 0))
        if left < 1:
            raise StateError(f"{fed} has no rounds left in its session")
        self.state.federations.request_start(fed, left, self.clock())

