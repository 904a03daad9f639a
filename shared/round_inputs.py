"""What a close reads into its RoundAggregator: every accepted update (`stream`), or, for the
linear rules, the round's committed partial sums plus the few updates no partial holds
(`reduce_partials`), whose cost does not grow with the number of updates.

Both return the same `RoundInputs`, so the manifest is built one way. Both weigh an update
min(n_i, c), c = max_weight_ratio x the median claim of the round (1 under central DP).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import statistics

import torch

from shared.errors import ObjectNotFound, Rejected
from shared.federation import FederationConfig
from shared.safetensors_reader import parse
from shared.settings import Settings
from shared.state import FederationState, RoundInfo, UpdateRecord
from shared.storage import ObjectStore
from shared.strategies.combine import RoundAggregator, padded
from shared.strategies.partial import PartialSum, UpdateStats, final_weight, needs_correction


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
            return parse(blob, layout, self.settings.max_header_bytes)
        except Rejected as rej:  # only bytes no device could write now (write-once) get here
            return rej.reason.value

    def stream(self, config: FederationConfig, info: RoundInfo, aggregator: RoundAggregator) -> RoundInputs:
        """Read every accepted update, in device order (the same bytes on a redo)."""
        agg = config.aggregation
        records = self.state.updates(config.name, info.round)
        claims = [r.num_samples for r in records.values()]
        cap = None if agg.dp or not claims else agg.max_weight_ratio * statistics.median(claims)
        contributors, excluded, stats = [], {}, UpdateStats()
        for device, rec in records.items():
            if aggregator.full:  # a robust rule's memory bound: the rest are left out, named in the manifest
                excluded[device] = "over_max_robust_updates"
                continue
            update = self.read_update(config, rec)
            if isinstance(update, str):
                excluded[device] = update
                continue
            aggregator.add(update, final_weight(rec.num_samples, cap, agg.dp), rec.clip_scale, rec.rank or None)
            contributors.append(device)
            stats.add(rec)
        return RoundInputs(aggregator, contributors, excluded, stats, cap,
                           {"incremental": False, "partials": 0, "read_at_close": len(records)})

    def reduce_partials(self, config: FederationConfig, info: RoundInfo, aggregator: RoundAggregator) -> RoundInputs:
        """The committed partials, corrected for the round's final weight cap, plus the updates no
        partial holds. Called only once the round is closing, when both sets are frozen."""
        fed, round_no, agg = config.name, info.round, config.aggregation
        uniform = agg.dp
        median = self.state.median_claim(fed, round_no)
        cap = None if uniform or median is None else agg.max_weight_ratio * median
        stats = UpdateStats()
        # partials and corrections add up in float64 and reach the float32 mean once
        total = {k: torch.zeros(s, dtype=torch.float64) for k, s in config.update_tensors.items()}
        weight, count = 0.0, 0
        entries = self.state.partial_entries(fed, round_no)
        # a partial holds at most two float64 sums of the layout: its size follows from the layout
        bound = 2 * 8 * sum(math.prod(s) for s in config.update_tensors.values()) + self.settings.max_header_bytes
        for slot, entry in entries.items():
            try:
                blob = self.store.get(entry["object_key"], bound)
            except (ObjectNotFound, Rejected) as exc:
                raise Unreducible(f"partial {slot}: {exc}") from None
            if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
                raise Unreducible(f"partial {slot} does not match its sha256")
            sums, w, n = PartialSum.decode(blob, config.update_tensors, entry,
                                           self.settings.max_header_bytes).contribution(cap)
            for k, acc in total.items():
                acc.add_(sums[k])
            weight, count = weight + w, count + n
            stats.merge(UpdateStats.from_dict(entry["stats"]))

        unfolded = self.state.unfolded(fed, round_no)
        corrected, dw = self._correct(config, info, total, cap, set(unfolded)) if cap is not None else (0, 0.0)
        if count:
            aggregator.add_sum(total, weight + dw, count)
        excluded = {}
        for device, rec in self.state.records(fed, round_no, unfolded).items():
            update = self.read_update(config, rec)
            if isinstance(update, str):
                excluded[device] = update
                continue
            aggregator.add(update, final_weight(rec.num_samples, cap, uniform), rec.clip_scale, rec.rank or None)
            stats.add(rec)
        contributors = [d for d in self.state.contributors(fed, round_no) if d not in excluded]
        if aggregator.count != len(contributors) or stats.count != len(contributors):
            raise Unreducible(f"partials hold {aggregator.count} updates, {len(contributors)} were accepted")
        return RoundInputs(aggregator, contributors, excluded, stats, cap,
                           {"incremental": True, "partials": len(entries), "read_at_close": len(unfolded) + corrected})

    def _correct(self, config: FederationConfig, info: RoundInfo, total: dict[str, torch.Tensor], cap: float,
                 unfolded: set[str]) -> tuple[int, float]:
        """Re-weigh the folded updates whose claim lies between the provisional cap t and the final
        cap: those under t were folded at n_i but weigh min(n_i, cap); those over t at cap but weigh n_i."""
        fed, round_no, t = config.name, info.round, info.weight_threshold
        t_or_inf = math.inf if t is None else t
        lo, hi = min(cap, t_or_inf), max(cap, t_or_inf)
        candidates = [d for d in self.state.claims_between(fed, round_no, lo, hi, inclusive_high=True)
                      if d not in unfolded]
        records = self.state.records(fed, round_no, candidates)
        done, weight = 0, 0.0
        for device in candidates:
            rec = records[device]
            dw = needs_correction(rec.num_samples, t, cap, False)
            if dw == 0.0:
                continue
            update = self.read_update(config, rec)
            if isinstance(update, str):
                raise Unreducible(f"{device}'s update, folded at a provisional weight, is {update}")
            for k, v in padded(update, config.update_tensors).items():
                total[k].add_(v, alpha=dw * rec.clip_scale)
            done, weight = done + 1, weight + dw
        return done, weight
