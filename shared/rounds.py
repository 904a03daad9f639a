"""Round lifecycle: start a federation, decide when a round closes, aggregate and publish."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Iterable

from shared import versions
from shared.adapter_spec import initial_weights
from shared.aggregation import StreamingFedAvg, apply_update, update_norm
from shared.evaluation import guard
from shared.errors import ObjectNotFound, Rejected, StateError
from shared.federation import DeviceProfile, FederationConfig
from shared.safetensors_reader import parse
from shared.settings import Settings
from shared.state import FederationState, RoundInfo
from shared.storage import ObjectStore

WAIT, CLOSING, FAILED = "wait", "closing", "failed"


def decide(info: RoundInfo, n_updates: int, min_updates: int, now: float, reported: int | None = None) -> str:
    """Close with quorum once everyone reported or the deadline passed; fail without it then.

    `reported` counts selected devices with a final outcome, accepted or rejected (default: the
    accepted ones): once all have one, nothing more can arrive, so waiting longer is pointless.
    """
    reported = n_updates if reported is None else reported
    quorum = n_updates >= min_updates
    everyone = info.cohort_size > 0 and reported >= info.cohort_size
    expired = now >= info.deadline
    if quorum and (everyone or expired):
        return CLOSING
    if expired or everyone:
        return FAILED
    return WAIT


@dataclasses.dataclass(frozen=True)
class CloseResult:
    decision: str  # wait | closing | failed | closed (already) | ...
    version: int | None = None
    next_round: RoundInfo | None = None
    manifest: dict | None = None
    info: RoundInfo | None = None  # the round as it was when the close began
    updates: int = 0  # accepted updates in the round
    aggregation_seconds: float = 0.0


class RoundCoordinator:
    def __init__(self, state: FederationState, store: ObjectStore, settings: Settings,
                 clock: Callable[[], float] = time.time) -> None:
        self.state = state
        self.store = store
        self.settings = settings
        self.clock = clock

    def start(self, config: FederationConfig, devices: Iterable[str | DeviceProfile]) -> tuple[RoundInfo, list[str]]:
        """Create the federation, publish version 0 and open round 1; also returns refused devices."""
        refused = self.state.create(config, devices)
        return self.begin_training(config.name, config.policy.max_rounds), refused

    def begin_training(self, fed: str, rounds: int) -> RoundInfo:
        """Open the next round of `fed` and allow `rounds` rounds from it (a training session)."""
        config = self.state.config(fed)
        if config is None:
            raise StateError(f"unknown federation {fed!r}")
        status = self.state.status(fed)
        round_no, version = int(status.get("round", 0)), int(status.get("version", 0))
        if round_no == 0:
            self._publish_initial(config, 0, parent=None)
        self.state.set_status(fed, "active", last_round=round_no + rounds)
        info = self._open(config, round_no + 1, version)
        if info is None:
            raise StateError(f"{fed} round {round_no + 1} was opened by someone else")
        return info

    def _publish_initial(self, config: FederationConfig, version: int, parent: int | None) -> None:
        """A fresh adapter (as PEFT initialises one) as `version`: the start, or a change of shape."""
        weights = initial_weights(config.spec, config.seed)
        versions.publish(self.store, config.name, version, weights, config.spec, {
            "round": 0 if parent is None else None, "parent_version": parent, "contributors": [],
            "total_samples": 0, "global_norm": update_norm(weights), "config_revision": config.revision,
            "reinitialized": parent is not None,
        })

    def _open(self, config: FederationConfig, round_no: int, base_version: int) -> RoundInfo | None:
        """Open a round under the pending config if there is one; a new adapter shape starts afresh."""
        pending = self.state.pending_config(config.name)
        if pending is not None and pending.spec.tensors != config.spec.tensors:
            base_version += 1  # the old adapter cannot be loaded into the new shape
            self._publish_initial(pending, base_version, parent=base_version - 1)
        policy = (pending or config).policy
        return self.state.open_round(config.name, round_no, base_version, self.clock(), policy.timeout_seconds,
                                     config=pending)

    def close(self, fed: str, round_no: int) -> CloseResult:
        """Close the round if it is due. Safe to call any number of times, from any worker."""
        opened = self.state.round_info(fed, round_no)
        config = self.state.config(fed, opened.config_rev if opened else None)
        if config is None:
            raise StateError(f"unknown federation {fed!r}")
        now = self.clock()
        decision, info = self.state.begin_close(
            fed, round_no, lambda i, n, reported: decide(i, n, config.policy.min_updates, now, reported))
        if decision == WAIT or decision == "closed":
            return CloseResult(decision, info.version)
        updates = self.state.update_count(fed, round_no)  # the records themselves are read once, below
        if decision == FAILED:
            return CloseResult(FAILED, None, self._next_round(config, round_no, info.base_version), info=info,
                               updates=updates)
        # closing: first time, or a redelivery after a worker died mid-aggregation; both redo it all.
        version = info.base_version + 1
        started = time.perf_counter()
        manifest = self._aggregate_and_publish(config, info, version)
        seconds = time.perf_counter() - started
        self.state.finish_round(fed, round_no, version, self.clock())
        return CloseResult(CLOSING, version, self._next_round(config, round_no, version), manifest, info=info,
                           updates=updates, aggregation_seconds=seconds)

    def _next_round(self, config: FederationConfig, round_no: int, base_version: int) -> RoundInfo | None:
        status = self.state.status(config.name)
        if status.get("status") in ("halted", "stopped"):
            return None
        if round_no >= int(status.get("last_round", config.policy.max_rounds)):
            self.state.complete(config.name)
            return None
        return self._open(config, round_no + 1, base_version)

    def _aggregate_and_publish(self, config: FederationConfig, info: RoundInfo, version: int) -> dict:
        spec, policy = config.spec, config.policy
        records = self.state.updates(config.name, info.round)
        avg = StreamingFedAvg(spec.tensors)
        contributors, excluded = [], {}
        for device, rec in records.items():  # sorted: the same order, so the same bytes, on a redo
            try:
                blob = self.store.get(rec.object_key, self.settings.max_update_bytes)
            except (ObjectNotFound, Rejected):
                excluded[device] = "object_missing"
                continue
            if hashlib.sha256(blob).hexdigest() != rec.sha256:
                # replaced after it was accepted: leave it out rather than trust unchecked bytes
                excluded[device] = "sha256_mismatch"
                continue
            avg.add(parse(blob, spec.tensors, self.settings.max_header_bytes), rec.num_samples, rec.clip_scale)
            contributors.append(device)
        if avg.count == 0:
            raise StateError(f"{config.name} round {info.round}: no accepted update could be read back")

        base = versions.load_weights(self.store, config.name, info.base_version, spec,
                                     self.settings.max_update_bytes, self.settings.max_header_bytes)
        mean = avg.mean()
        server_lr = self.state.server_lr(config.name, policy.server_lr)  # the forgetting guard may lower it
        weights = apply_update(base, mean, server_lr)
        kept = [records[d] for d in contributors]
        manifest = {
            "round": info.round, "parent_version": info.base_version, "contributors": contributors,
            "excluded": excluded, "total_samples": int(avg.total_weight),
            "update_norms": {
                "pre_clip_mean": sum(r.norm for r in kept) / len(kept),
                "pre_clip_max": max(r.norm for r in kept),
                "post_clip_mean": sum(r.norm * r.clip_scale for r in kept) / len(kept),
                "clipped": sum(1 for r in kept if r.clip_scale < 1.0),
            },
            "mean_delta_norm": update_norm(mean), "global_norm": update_norm(weights),
            "server_lr": server_lr, "max_grad_norm": policy.max_grad_norm, "config_revision": config.revision,
            "train_seconds_mean": sum(r.train_seconds for r in kept) / len(kept),
            # no wall-clock time in here: a redone close must write byte-identical files
            "last_update_at": max(r.accepted_at for r in kept),
        }
        return versions.publish(self.store, config.name, version, weights, spec, manifest)

    def evaluate(self, fed: str, version: int, evaluator) -> dict:
        """Evaluate a published version, record it (Redis and its manifest), and apply the forgetting guard."""
        revision = versions.manifest(self.store, fed, version).get("config_revision")
        config = self.state.config(fed, revision)
        if config is None or config.evaluation is None:
            raise StateError(f"{fed} has no evaluation config")
        done = self.state.evaluation(fed, version)
        if done is not None:
            return done  # a redelivered evaluate: the result stands
        weights = versions.load_weights(self.store, fed, version, config.spec, self.settings.max_update_bytes,
                                        self.settings.max_header_bytes)
        result = evaluator.evaluate(weights, version)
        action = guard(config.evaluation, result)
        if action is not None:
            ratio, limit = result["forgetting_ratio"], config.evaluation.forgetting_threshold
            if action == "halt":
                message = f"v{version}: general perplexity ratio {ratio:.3f} > {limit}: federation halted"
                self.state.apply_guard(fed, "halt", message)
            else:
                lr = self.state.server_lr(fed, config.policy.server_lr) * config.evaluation.lr_factor
                message = f"v{version}: general perplexity ratio {ratio:.3f} > {limit}: server_lr lowered to {lr:g}"
                self.state.apply_guard(fed, "lower_lr", message, lr)
            result["guard"] = message
        versions.add_evaluation(self.store, fed, version, result)
        self.state.record_evaluation(fed, version, result)
        return result
