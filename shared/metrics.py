"""Prometheus metrics, defined once; every metric takes the registry it is given.

Labels are bounded: federation, reason (the closed RejectReason set), tier, stage, outcome, queue.
A device id is never a label: per-device facts (training time) go into histograms.

Events (updates, rounds, timings) are counted where they happen, in the workers: under Celery
prefork each pool process increments its own copy, and prometheus-client's multiprocess mode
(PROMETHEUS_MULTIPROC_DIR, set by `fleettune worker`) sums them when the worker's main process is
scraped. Facts about a federation (its version, adapter norm, perplexity) are read from Redis and
the store at scrape time by FederationCollector, served once, by the API: a gauge set by whichever
worker last touched it would disagree between workers. Redis holds the authoritative counts
(`state.federations.stats`); the counters here are for watching.
"""

from __future__ import annotations

import functools
import os
import time

import redis
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from fleettune.shared import keys
from fleettune.shared.state import broker
from fleettune.shared.errors import ObjectNotFound, StorageUnavailable

NORM_BUCKETS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100, float("inf"))
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32, float("inf"))  # versions
BYTES_BUCKETS = tuple(float(2 ** p) for p in range(10, 27, 2))  # 1 KiB to 64 MiB: an update object's size
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, float("inf"))


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


@functools.cache
def process_metrics() -> Metrics:
    """The metrics of prometheus-client's default registry, which is itself one per process."""
    return Metrics(REGISTRY)


class Metrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        fed = ["federation"]
        kw = {"registry": registry}
        self.received = Counter("fleettune_updates_received", "Update envelopes received (redeliveries not counted)", fed, **kw)
        self.accepted = Counter("fleettune_updates_accepted", "Updates accepted into a round", fed, **kw)
        self.rejected = Counter("fleettune_updates_rejected", "Updates rejected, by reason", fed + ["reason"], **kw)
        self.exports = Counter("fleettune_exports", "Exports of published versions to on-device formats, by outcome "
                               "(ready, retried, failed)", ["format", "outcome"], **kw)
        self.redelivered = Counter("fleettune_messages_redelivered", "Messages seen again after being settled", **kw)
        self.bytes_ingested = Counter("fleettune_bytes_ingested", "Bytes of accepted update objects", fed, **kw)
        self.update_norm = Histogram("fleettune_update_norm", "L2 norm of accepted updates, before and after clipping",
                                     fed + ["stage"], buckets=NORM_BUCKETS, **kw)
        self.train_seconds = Histogram("fleettune_device_train_seconds", "Local training time reported by devices",
                                       fed + ["tier"], buckets=SECONDS_BUCKETS, **kw)
        self.late_updates = Counter("fleettune_late_updates", "Updates that arrived after their round closed", fed, **kw)
        self.timed_out_devices = Counter("fleettune_devices_timed_out",
                                         "Selected devices that had not reported when their round closed", fed, **kw)
        self.selected_devices = Counter("fleettune_devices_selected", "Devices selected into closed rounds", fed, **kw)
        self.rounds = Counter("fleettune_rounds", "Rounds that ended, by outcome (closed or failed)", fed + ["outcome"], **kw)
        self.round_failures = Counter("fleettune_round_failures", "Failed rounds, by reason", fed + ["reason"], **kw)
        self.round_seconds = Histogram("fleettune_round_duration_seconds", "From a round's opening to its close",
                                       fed, buckets=SECONDS_BUCKETS, **kw)
        self.aggregation_seconds = Histogram("fleettune_aggregation_seconds", "Time to aggregate and publish a round",
                                             fed, buckets=SECONDS_BUCKETS, **kw)
        self.staleness = Histogram("fleettune_update_staleness", "Async rounds: versions published between an "
                                   "accepted update's base and the buffer it joined", fed, buckets=STALENESS_BUCKETS, **kw)
        self.update_bytes = Histogram("fleettune_update_bytes", "Bytes of an accepted update object, by its encoding "
                                      "(float32, float16, bfloat16, int8, int4, int2, topk)", fed + ["encoding"],
                                      buckets=BYTES_BUCKETS, **kw)

    def observe_ingest(self, result) -> None:
        """One settled envelope (an IngestResult); redeliveries change nothing."""
        if result.outcome == "redelivered":
            self.redelivered.inc()
            return
        fed = result.federation or "_unknown"
        self.received.labels(fed).inc()
        if result.outcome == "accepted":
            self.accepted.labels(fed).inc()
            self.bytes_ingested.labels(fed).inc(result.nbytes)
            self.update_bytes.labels(fed, result.encoding or "float32").observe(result.nbytes)
            self.update_norm.labels(fed, "pre_clip").observe(result.norm)
            self.update_norm.labels(fed, "post_clip").observe(result.norm * result.clip_scale)
            self.train_seconds.labels(fed, result.tier).observe(result.train_seconds or 0.0)
            if result.staleness is not None:
                self.staleness.labels(fed).observe(result.staleness)
        else:
            self.rejected.labels(fed, result.reason.value).inc()
            if result.reason.value == "stale_round":
                self.late_updates.labels(fed).inc()

    def observe_export(self, fmt: str, outcome: str) -> None:
        self.exports.labels(fmt, outcome).inc()

    def observe_close(self, fed: str, result, now: float) -> None:
        """A round that closed or failed (a CloseResult); waits and repeats change nothing."""
        if result.decision not in ("closed", "failed") or result.info is None:
            return
        info = result.info
        outcome = result.decision
        self.rounds.labels(fed, outcome).inc()
        self.selected_devices.labels(fed).inc(info.cohort_size)
        if info.mode != "async":  # a buffer's devices that checked in may still join the next one
            self.timed_out_devices.labels(fed).inc(max(0, info.cohort_size - result.updates))
        self.round_seconds.labels(fed).observe(max(0.0, now - info.opened_at))
        if outcome == "failed":
            self.round_failures.labels(fed, result.reason or "no_quorum").inc()
            return
        self.aggregation_seconds.labels(fed).observe(result.aggregation_seconds)


class FederationCollector:
    """Per-federation state gauges, read at scrape time from the authoritative state."""

    def __init__(self, state, store, clock=time.time) -> None:
        self.state = state
        self.store = store
        self.clock = clock
        self._facts: dict[tuple[str, int], dict] = {}  # versions are immutable: read each manifest once

    def collect(self):
        gauges = {
            "version": GaugeMetricFamily("fleettune_adapter_version", "Newest published global version", labels=["federation"]),
            "round": GaugeMetricFamily("fleettune_current_round", "The round now open (or last ended)", labels=["federation"]),
            "norm": GaugeMetricFamily("fleettune_adapter_norm", "L2 norm of the newest global adapter", labels=["federation"]),
            "ppl": GaugeMetricFamily("fleettune_heldout_perplexity", "Held-out perplexity of the newest evaluated version",
                                     labels=["federation"]),
            "base": GaugeMetricFamily("fleettune_base_heldout_perplexity", "Held-out perplexity of the base model",
                                      labels=["federation"]),
            "forget": GaugeMetricFamily("fleettune_forgetting_ratio",
                                        "General-text perplexity of base + adapter over the base model's", labels=["federation"]),
            "overdue": GaugeMetricFamily("fleettune_round_overdue_seconds",
                                         "How long the open round is past its deadline (0 when not)", labels=["federation"]),
            "closing": GaugeMetricFamily("fleettune_round_closing_seconds",
                                         "How long the current round has been closing (0 when it is not)",
                                         labels=["federation"]),
            "epsilon": GaugeMetricFamily("fleettune_dp_epsilon", "Cumulative (epsilon, delta)-DP of the newest version "
                                         "(central DP only)", labels=["federation"]),
            "epsilon_round": GaugeMetricFamily("fleettune_dp_epsilon_round", "Epsilon of one round's release",
                                               labels=["federation"]),
            "dropped": GaugeMetricFamily("fleettune_truncation_energy_dropped", "Share of the exact LoRA mean's "
                                         "energy the re-factorisation dropped (exact aggregation only)",
                                         labels=["federation"]),
            "partials": GaugeMetricFamily("fleettune_close_partials", "Partial sums the newest version's close "
                                          "reduced (0: it read every update)", labels=["federation"]),
            "buffer": GaugeMetricFamily("fleettune_buffer_fill", "Async rounds: accepted updates in the open "
                                        "buffer over its buffer_size (it publishes at 1)", labels=["federation"]),
            "read": GaugeMetricFamily("fleettune_close_updates_read", "Updates the newest version's close read "
                                      "itself (a growing share: partial commits are failing or slow)",
                                      labels=["federation"]),
        }
        now = self.clock()
        for fed in self.state.federations.names():
            status = self.state.federations.status(fed)
            version = int(status.get("version", 0))
            round_no = int(status.get("round", 0))
            gauges["version"].add_metric([fed], version)
            gauges["round"].add_metric([fed], round_no)
            info = self.state.rounds.round_info(fed, round_no) if round_no else None
            overdue = max(0.0, now - info.deadline) if info and info.status == "open" else 0.0
            closing = max(0.0, now - (info.closing_at or now)) if info and info.status == "closing" else 0.0
            gauges["overdue"].add_metric([fed], overdue)
            gauges["closing"].add_metric([fed], closing)
            if info and info.mode == "async" and info.status == "open":
                gauges["buffer"].add_metric([fed], self.state.rounds.update_count(fed, round_no) / max(info.buffer_size, 1))
            for name, value in self._version_facts(fed, version).items():
                if value is not None:
                    gauges[name].add_metric([fed], value)
            evaluation = self.state.evaluations.latest_evaluation(fed)
            if evaluation:
                gauges["ppl"].add_metric([fed], evaluation["heldout_mean"])
                gauges["base"].add_metric([fed], evaluation["base_heldout_mean"])
                if "forgetting_ratio" in evaluation:
                    gauges["forget"].add_metric([fed], evaluation["forgetting_ratio"])
        yield from gauges.values()
        yield from self._rollouts()
        yield from self._secure()
        yield from self._pipeline_health(now)

    def _version_facts(self, fed: str, version: int) -> dict:
        """Gauges read from a version's manifest, cached per version (manifests never change);
        none for a federation never trained, or while S3 is unreachable: a scrape never fails on them."""
        from fleettune.shared.protocol import versions

        if (fed, version) not in self._facts:
            try:
                manifest = versions.manifest(self.store, fed, version)
            except (ObjectNotFound, StorageUnavailable):
                return {}
            agg, dp = manifest.get("aggregation") or {}, manifest.get("dp") or {}
            self._facts[(fed, version)] = {
                "norm": manifest["global_norm"], "epsilon": dp.get("epsilon"), "epsilon_round": dp.get("epsilon_round"),
                "dropped": agg.get("truncation_energy_dropped"), "partials": agg.get("partials"),
                "read": agg.get("read_at_close")}
        return self._facts[(fed, version)]

    def _rollouts(self):
        """Each federation's newest canary rollout: its percentage, and what its devices report."""
        import json

        from fleettune.shared.control.rollouts import LIVE

        percent = GaugeMetricFamily("fleettune_rollout_percent", "Share of targeted devices on the candidate "
                                    "version in the newest rollout", labels=["federation", "version", "status"])
        reported = GaugeMetricFamily("fleettune_rollout_reported", "Mean device-reported quality per version and "
                                     "arm at the rollout's last look", labels=["federation", "version", "arm", "metric"])
        rollbacks = CounterMetricFamily("fleettune_rollout_rollbacks", "Rollouts rolled back, by trigger (auto: a "
                                        "quality gate broke)", labels=["federation", "trigger"])
        serving = GaugeMetricFamily("fleettune_serving_version", "The version devices serve outside a canary",
                                    labels=["federation"])
        paused = GaugeMetricFamily("fleettune_rollout_paused_seconds", "How long the live rollout has been paused "
                                   "(0 while it is not; an inconclusive step pauses by itself)",
                                   labels=["federation", "version"])
        for fed in self.state.federations.names():
            stats = self.state.federations.stats(fed)
            for trigger in ("auto", "manual"):
                rollbacks.add_metric([fed, trigger], stats.get(f"rollbacks:{trigger}", 0))
            serving.add_metric([fed], int(self.state.r.hget(keys.fed_state(fed), "serving") or 0))
            newest = self.state.r.zrevrange(keys.fed_rollouts(fed), 0, 0)
            raw = self.state.r.get(keys.rollout(fed, newest[0].decode())) if newest else None
            if raw is None:
                continue
            rec = json.loads(raw)
            percent.add_metric([fed, str(rec["version"]), rec["status"]], rec["percent"])
            if rec["status"] in LIVE:
                since = [h["at"] for h in rec["history"] if h["action"] == "pause"]
                paused.add_metric([fed, str(rec["version"])],
                                  time.time() - since[-1] if rec["status"] == "paused" and since else 0.0)
            for arm, version in (("canary", rec["version"]), ("control", rec["previous"])):
                for metric, value in (rec["arms"].get(arm) or {}).items():
                    if metric != "devices":
                        reported.add_metric([fed, str(version), arm, metric], value)
        yield from (percent, reported, rollbacks, serving, paused)

    def _secure(self):
        """Secure aggregation: stage answers refused and unmaskings that failed, by reason (from the
        federation's counters, so every API and worker process counts into one series)."""
        refused = CounterMetricFamily("fleettune_secagg_refused", "Secure-aggregation stage answers refused, by "
                                      "reason", labels=["federation", "reason"])
        failed = CounterMetricFamily("fleettune_secagg_failed", "Secure-aggregation unmaskings that failed (the "
                                     "attempt restarted, or the round failed), by reason", labels=["federation", "reason"])
        for fed in self.state.federations.names():
            for name, count in self.state.federations.stats(fed).items():
                kind, _, reason = name.partition(":")
                if kind == "secagg_refused":
                    refused.add_metric([fed, reason], count)
                elif kind == "secagg_failed":
                    failed.add_metric([fed, reason], count)
        yield from (refused, failed)

    def _pipeline_health(self, now: float):
        """Beat's heartbeat age, and the ledger's re-drives, pending messages and exhausted retries."""
        beat = GaugeMetricFamily("fleettune_heartbeat_age_seconds", "Seconds since a process was last seen alive",
                                 labels=["process"])
        for process, seen in self.state.federations.heartbeats().items():
            beat.add_metric([process], max(0.0, now - seen))
        yield beat
        stats = self.state.federations.stats(None)
        yield CounterMetricFamily("fleettune_messages_redriven", "Received messages re-enqueued from the ledger "
                                  "because they had no outcome (lost by the broker, or retries exhausted)",
                                  value=stats.get("redriven", 0))
        yield CounterMetricFamily("fleettune_ingest_retries_exhausted", "Ingests that ran out of retries in an outage",
                                  value=stats.get("retries_exhausted", 0))
        yield GaugeMetricFamily("fleettune_received_pending", "Received messages not yet known to have an outcome",
                                value=self.state.r.zcard(keys.RECEIVED_PENDING))


class QueueCollector:
    """Queue depth and oldest-message age, read from the broker at scrape time."""

    def __init__(self, client: redis.Redis, queues: tuple[str, ...], clock=time.time) -> None:
        self.client = client
        self.queues = queues
        self.clock = clock

    def collect(self):
        depth = GaugeMetricFamily("fleettune_queue_depth", "Messages waiting in a broker queue", labels=["queue"])
        age = GaugeMetricFamily("fleettune_queue_oldest_age_seconds",
                                "Age of the oldest waiting message (0 when empty)", labels=["queue"])
        for queue in self.queues:
            try:
                n = self.client.llen(queue)
                sent = broker.oldest_sent_at(self.client, queue)
            except redis.RedisError:
                continue  # no broker, no sample: an absent series is what alerts should see
            depth.add_metric([queue], n)
            age.add_metric([queue], max(0.0, self.clock() - sent) if sent else 0.0)
        yield depth
        yield age
