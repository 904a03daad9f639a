"""What a close reads: the base version it builds on (`BaseVersion`, once), and the round's
updates into its RoundAggregator (`RoundReader.read`): every accepted update (`stream`), or, for the
linear rules, the round's committed partial sums plus the few updates no partial holds
(`reduce_partials`), whose cost does not grow with the number of updates.

Both return the same `RoundInputs`, so the manifest is built one way. Both weigh an update
min(n_i, cap), the cap fixed per round by its reference claim (see shared.strategies.partial; 1
under central DP).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from concurrent.futures import ThreadPoolExecutor

import torch

from fleettune.shared.errors import ObjectNotFound, Rejected
from fleettune.shared.federation import FederationConfig
from fleettune.shared.protocol import versions
from fleettune.shared.protocol.compression import read_update
from fleettune.shared.settings import Settings
from fleettune.shared.state import FederationState, RoundInfo, UpdateRecord
from fleettune.shared.storage import ObjectStore
from fleettune.shared.strategies import privacy
from fleettune.shared.strategies.combine import RoundAggregator, padded
from fleettune.shared.strategies.partial import PartialSum, UpdateStats, record_weight, weight_cap


log = logging.getLogger(__name__)


class Unreducible(Exception):
    """The partial sums cannot give this round's mean (an object vanished): stream instead."""


@dataclasses.dataclass
class RoundInputs:
    aggregator: RoundAggregator
    contributors: list[str]
    excluded: dict[str, str]  # device -> why its accepted update was left out
    stats: UpdateStats
    cap: float | None  # the weight cap applied (None: none, or uniform weights under DP)
    fields: dict  # for the manifest's "aggregation"


@dataclasses.dataclass(frozen=True)
class BaseVersion:
    """Everything a close builds on, read once before it aggregates: the base version's weights
    (and each tier's), the server optimizer's state and SCAFFOLD's control variate where the
    strategy keeps them, the DP ledger, the population and this round's noise seed."""

    weights: dict[str, torch.Tensor]
    tiers: dict[int, dict[str, torch.Tensor]]
    optimizer_state: dict[str, torch.Tensor]
    control: dict[str, torch.Tensor] | None
    dp_ledger: tuple
    population: int  # enrolled devices: SCAFFOLD's participation is the cohort's share of them
    noise_seed: int

    @classmethod
    def load(cls, state: FederationState, store: ObjectStore, settings: Settings, config: FederationConfig,
             info: RoundInfo) -> BaseVersion:
        fed, version, agg = config.name, info.base_version, config.aggregation
        limit, header = settings.max_update_bytes, settings.max_header_bytes
        return cls(
            weights=versions.load_weights(store, fed, version, config.spec, limit, header),
            tiers={rank: versions.load_tier_weights(store, fed, version, rank, config.spec_for(rank), limit, header)
                   for rank in set(config.tier_ranks.values())},
            optimizer_state=versions.load_optimizer_state(store, fed, version, limit) if agg.optimizer != "sgd" else {},
            control=versions.load_control(store, fed, version, limit) if agg.drift_control == "scaffold" else None,
            dp_ledger=privacy.ledger_of(versions.manifest(store, fed, version)),
            population=state.federations.enrolled_count(fed),
            noise_seed=privacy.noise_seed(state.federations.secret(fed), info.round) if agg.dp else 0,
        )


class RoundReader:
    def __init__(self, state: FederationState, store: ObjectStore, settings: Settings) -> None:
        self.state, self.store, self.settings = state, store, settings

    def read_update(self, config: FederationConfig, record: UpdateRecord) -> dict | str:
        """An accepted update's tensors, or why it cannot be read any more. The sha256 ingest
        verified is trusted where update objects are write-once; otherwise it is checked again."""
        try:
            blob = self.store.get(record.object_key, self.settings.max_update_bytes)
        except (ObjectNotFound, Rejected):
            return "object_missing"
        if not self.settings.updates_write_once and hashlib.sha256(blob).hexdigest() != record.sha256:
            return "sha256_mismatch"  # replaced after it was accepted: never trust unchecked bytes
        layout = config.update_tensors_for(record.rank or config.adapter.rank)
        try:
            return read_update(blob, layout, self.settings.max_header_bytes)[0]
        except Rejected as rej:  # only bytes no device could write now (write-once) get here
            return rej.reason.value

    def read(self, config: FederationConfig, info: RoundInfo, base: BaseVersion) -> RoundInputs:
        """The round's updates in a fresh RoundAggregator over `base`: from the partial sums where
        the rule folds (falling back to every update if one is unusable), else every update."""
        def combiner() -> RoundAggregator:
            return RoundAggregator(config.aggregation, base.weights, config.update_tensors, config.adapter.rank,
                                   config.adapter.alpha, base.tiers)

        if config.aggregation.folds:
            try:
                return self.reduce_partials(config, info, combiner())
            except Unreducible as exc:  # a partial or a re-weighed update is unreadable: read them all
                log.warning("%s round %s: partial sums unusable (%s); reading every update", config.name,
                            info.round, exc)
        return self.stream(config, info, combiner())

    def stream(self, config: FederationConfig, info: RoundInfo, aggregator: RoundAggregator) -> RoundInputs:
        """Read every accepted update, in device order (the same bytes on a redo)."""
        agg = config.aggregation
        records = self.state.rounds.updates(config.name, info.round)
        cap = self.cap(config, info)
        contributors, excluded, stats = [], {}, UpdateStats()
        for device, rec in records.items():
            if aggregator.full:  # a robust rule's memory bound: the rest are left out, named in the manifest
                excluded[device] = "over_max_robust_updates"
                continue
            update = self.read_update(config, rec)
            if isinstance(update, str):
                excluded[device] = update
                continue
            aggregator.add(update, record_weight(rec, cap, agg.dp), rec.scale, rec.rank or None)
            contributors.append(device)
            stats.add(rec)
        return RoundInputs(aggregator, contributors, excluded, stats, cap,
                           {"incremental": False, "partials": 0, "read_at_close": len(records)})

    def reduce_partials(self, config: FederationConfig, info: RoundInfo, aggregator: RoundAggregator) -> RoundInputs:
        """The committed partials, the few updates folded before the round's weight cap was known
        re-weighed, and the updates no partial holds. Called only once the round is closing, when
        the partials and the unfolded set are frozen."""
        fed, round_no, agg = config.name, info.round, config.aggregation
        uniform = agg.dp
        cap = self.cap(config, info)
        stats = UpdateStats()
        # partials and corrections add up in float64 and reach the float32 mean once
        total = {k: torch.zeros(s, dtype=torch.float64) for k, s in config.update_tensors.items()}
        total_weight, count = 0.0, 0
        entries = self.state.partials.partial_entries(fed, round_no)
        # a partial holds a float32 and at most one float64 sum of the layout: its size follows from it
        bound = 12 * sum(math.prod(s) for s in config.update_tensors.values()) + self.settings.max_header_bytes

        def fetch(item: tuple[str, dict]) -> bytes:
            slot, entry = item
            try:
                blob = self.store.get(entry["object_key"], bound)
            except (ObjectNotFound, Rejected) as exc:
                raise Unreducible(f"partial {slot}: {exc}") from None
            if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
                raise Unreducible(f"partial {slot} does not match its sha256")
            return blob

        # the reads overlap (S3 round trips and hashing release the GIL); the sums stay in slot order
        with ThreadPoolExecutor(max_workers=min(8, len(entries) or 1)) as pool:
            blobs = list(pool.map(fetch, entries.items()))
        for blob, entry in zip(blobs, entries.values()):
            partial = PartialSum.decode(blob, config.update_tensors, entry, self.settings.max_header_bytes)
            partial.add_to(total)
            total_weight, count = total_weight + partial.weight, count + partial.count
            stats.merge(UpdateStats.from_dict(entry["stats"]))

        unfolded = self.state.partials.unfolded(fed, round_no)
        corrected, dw = self._correct(config, info, total, cap, set(unfolded)) if cap is not None else (0, 0.0)
        if count:
            aggregator.add_sum(total, total_weight + dw, count)
        excluded = {}
        for device, rec in self.state.partials.records(fed, round_no, unfolded).items():
            update = self.read_update(config, rec)
            if isinstance(update, str):
                excluded[device] = update
                continue
            aggregator.add(update, record_weight(rec, cap, uniform), rec.scale, rec.rank or None)
            stats.add(rec)
        contributors = [d for d in self.state.partials.contributors(fed, round_no) if d not in excluded]
        if aggregator.count != len(contributors) or stats.count != len(contributors):
            raise Unreducible(f"partials hold {aggregator.count} updates, {len(contributors)} were accepted")
        return RoundInputs(aggregator, contributors, excluded, stats, cap,
                           {"incremental": True, "partials": len(entries), "read_at_close": len(unfolded) + corrected})

    def cap(self, config: FederationConfig, info: RoundInfo) -> float | None:
        """The round's weight cap: from its reference claim, or, in a round that closed before it
        had one (fewer than REFERENCE_SAMPLE accepted), from the median of all its claims."""
        agg = config.aggregation
        reference = info.reference_claim
        if reference is None:
            reference = self.state.partials.median_claim(config.name, info.round)
        return weight_cap(reference, agg.max_weight_ratio, agg.dp)

    def _correct(self, config: FederationConfig, info: RoundInfo, total: dict[str, torch.Tensor], cap: float,
                 unfolded: set[str]) -> tuple[int, float]:
        """Re-weigh the folded updates accepted before the cap was known: folded at n_i, they
        weigh min(n_i, cap) (times their participation weight). Only a first round has them, at most REFERENCE_SAMPLE - 1."""
        fed, round_no = config.name, info.round
        candidates = [d for d in self.state.partials.uncapped(fed, round_no) if d not in unfolded]
        records = self.state.partials.records(fed, round_no, candidates)
        done, dw_total = 0, 0.0
        for device in candidates:
            rec = records[device]
            dw = record_weight(rec, cap, False) - record_weight(rec, None, False)
            if dw == 0.0:
                continue
            update = self.read_update(config, rec)
            if isinstance(update, str):
                raise Unreducible(f"{device}'s update, folded before the weight cap was known, is {update}")
            for k, v in padded(update, config.update_tensors).items():
                total[k].add_(v, alpha=dw * rec.scale)
            done, dw_total = done + 1, dw_total + dw
        return done, dw_total
