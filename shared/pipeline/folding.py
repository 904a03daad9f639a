"""Each ingest process folds the updates it accepts into its own running partial sum per round,
and commits it to the object store now and then, so a close reduces a handful of partials.

The process already holds the parsed tensors, so folding costs one fused multiply-add per update
and no second read. A commit (write the object, then `state.partials.commit_partial`) happens
when `batch` updates are pending, when the round is within `tail` devices of complete, or when
the partial has been idle for `idle_s` (a timer thread), so the close seldom reads an update
itself. A process that dies loses only uncommitted folds: their updates stay `unfolded` and the
close reads them from the store. Each in-memory partial has its own slot id, so a commit never
replaces another process's partial or an earlier partial of this one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping

import torch

from fleettune.shared import keys
from fleettune.shared.federation import FederationConfig
from fleettune.shared.state import FederationState, UpdateRecord
from fleettune.shared.state.partials import REFUSED
from fleettune.shared.storage import ObjectStore
from fleettune.shared.strategies.combine import padded
from fleettune.shared.strategies.partial import PartialSum, UpdateStats

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Open:
    slot: str
    partial: PartialSum
    stats: UpdateStats
    pending: list[str] = dataclasses.field(default_factory=list)  # folded since the last commit
    gen: int = 0
    last_add: float = 0.0
    unsure: int = 0  # members of a commit whose reply was lost: it may have gone through


class PartialFolder:
    def __init__(self, state: FederationState, store: ObjectStore, batch: int = 64, tail: int = 8,
                 idle_s: float = 0.5, clock: Callable[[], float] = time.monotonic) -> None:
        self.state, self.store = state, store
        self.batch, self.tail, self.idle_s, self.clock = batch, tail, idle_s, clock
        self._process = uuid.uuid4().hex[:12]
        self._serial = 0
        self._open: dict[tuple[str, int], _Open] = {}
        self._lock = threading.Lock()
        self._timer: threading.Thread | None = None

    def fold(self, config: FederationConfig, round_no: int, record: UpdateRecord, update: Mapping[str, torch.Tensor],
             weight: float, early: bool, reported: int, cohort: int) -> None:
        """Fold one accepted update at its sample weight (`early`: accepted before the round's
        weight cap was known); commit when a batch is full or the round is nearly complete."""
        key = (config.name, round_no)
        with self._lock:
            slot = self._open.get(key)
            if slot is None:
                self._serial += 1
                shapes = config.update_tensors
                slot = self._open[key] = _Open(f"{self._process}-{self._serial}", PartialSum(shapes), UpdateStats())
            slot.partial.add(padded(update, slot.partial.shapes), weight, record.scale, early)
            slot.stats.add(record)
            slot.pending.append(record.device)
            slot.last_add = self.clock()
            if len(slot.pending) >= self.batch or (cohort > 0 and cohort - reported <= self.tail):
                self._commit(key, slot)
        self._start_timer()

    def flush(self, fed: str | None = None, round_no: int | None = None) -> None:
        """Commit pending folds now (all rounds, or one)."""
        with self._lock:
            for key, slot in list(self._open.items()):
                if fed is None or key == (fed, round_no):
                    self._commit(key, slot)

    def flush_idle(self) -> None:
        now = self.clock()
        with self._lock:
            for key, slot in list(self._open.items()):
                if slot.pending and now - slot.last_add >= self.idle_s:
                    self._commit(key, slot)

    def _commit(self, key: tuple[str, int], slot: _Open) -> None:
        """Write the partial and commit it; never raises (uncommitted updates are read at close)."""
        fed, round_no = key
        if slot.unsure and not self._settle_unsure(fed, round_no, slot):
            return
        if not slot.pending:
            return
        object_key = keys.partial_object(fed, round_no, slot.slot, slot.gen + 1)
        try:
            blob = slot.partial.encode()
            self.store.put(object_key, blob)
            entry = {"object_key": object_key, "sha256": hashlib.sha256(blob).hexdigest(), "gen": slot.gen + 1,
                     **slot.partial.metadata(), "stats": slot.stats.to_dict()}
            result = self.state.partials.commit_partial(fed, round_no, slot.slot, entry, slot.pending)
        except Exception:  # S3 or Redis away, or a bug: keep the folds and try again later
            log.exception("commit of partial %s of %s round %s failed", slot.slot, fed, round_no)
            slot.unsure = len(slot.pending)
            return
        if result == REFUSED:  # the round is closing: its close reads these updates itself
            del self._open[key]
            return
        slot.gen += 1
        slot.pending.clear()
        if slot.gen > 1:  # the previous generation is superseded (retention removes any left over)
            try:
                self.store.delete(keys.partial_object(fed, round_no, slot.slot, slot.gen - 1))
            except Exception:
                log.warning("could not delete a superseded partial of %s round %s", fed, round_no)

    def _settle_unsure(self, fed: str, round_no: int, slot: _Open) -> bool:
        """After a failed commit, learn whether it went through before committing again (a
        member must never be offered to a second commit). False: Redis is still away."""
        try:
            stored = self.state.partials.partial_entries(fed, round_no).get(slot.slot)
        except Exception:
            return False
        if stored is not None and stored["gen"] == slot.gen + 1:  # it did: those members are folded
            del slot.pending[:slot.unsure]
            slot.gen += 1
        slot.unsure = 0
        return True

    def _start_timer(self) -> None:
        if self._timer is not None:
            return
        self._timer = threading.Thread(target=self._run_timer, name="fleettune-fold-timer", daemon=True)
        self._timer.start()

    def _run_timer(self) -> None:
        while True:
            time.sleep(self.idle_s / 2)
            try:
                self.flush_idle()
                self._drop_stale()
            except Exception:
                log.exception("partial fold timer")

    def _drop_stale(self) -> None:
        """A partial with nothing pending whose round has left open holds memory for nothing."""
        with self._lock:
            idle = [k for k, s in self._open.items() if not s.pending and self.clock() - s.last_add > 10 * self.idle_s]
        for fed, round_no in idle:
            info = self.state.rounds.round_info(fed, round_no)
            if info is None or info.status != "open":
                with self._lock:
                    slot = self._open.get((fed, round_no))
                    if slot is not None and not slot.pending:
                        del self._open[(fed, round_no)]
