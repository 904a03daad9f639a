"""Grafana dashboards as code (grafana-foundation-sdk): one per concern.

    python deploy/grafana/dashboards.py          # writes deploy/grafana/dashboards/*.json

The JSON files are committed so Grafana's file provisioning can load them; a test checks they are
what this script writes, and that every query returns data from a real pipeline run.
"""

from __future__ import annotations

import json
from pathlib import Path

from grafana_foundation_sdk.builders.dashboard import Dashboard, QueryVariable, Row
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.stat import Panel as Stat
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef

OUT = Path(__file__).resolve().parent / "dashboards"
PROMETHEUS = DataSourceRef(type_val="prometheus", uid="fleettune-prometheus")
FED = 'federation=~"$federation"'
RATE = "$__rate_interval"


def query(expr: str, legend: str = "") -> Dataquery:
    q = Dataquery().expr(expr).datasource(PROMETHEUS)
    return q.legend_format(legend) if legend else q


def series(title: str, unit: str, *queries: Dataquery, description: str = "") -> Timeseries:
    panel = Timeseries().title(title).unit(unit).datasource(PROMETHEUS).height(8).span(12)
    if description:
        panel = panel.description(description)
    for ref, q in zip("ABCDEFGH", queries):
        panel = panel.with_target(q.ref_id(ref))
    return panel


def base(title: str, uid: str) -> Dashboard:
    federation = (QueryVariable("federation").label("federation").datasource(PROMETHEUS)
                  .query("label_values(fleettune_updates_received_total, federation)")
                  .include_all(True).multi(True).all_value(".*"))
    return (Dashboard(title).uid(uid).tags(["fleettune"]).refresh("30s").time("now-6h", "now")
            .with_variable(federation))


def training_quality() -> Dashboard:
    return (
        base("fleettune / training quality", "fleettune-training")
        .with_row(Row("Global adapter"))
        .with_panel(series("Held-out perplexity (newest evaluated version)", "none",
                           query(f"fleettune_heldout_perplexity{{{FED}}}", "{{federation}}"),
                           query(f"fleettune_base_heldout_perplexity{{{FED}}}", "{{federation}} base"),
                           description="Should fall smoothly; a rise between versions is a regression."))
        .with_panel(series("Forgetting: general perplexity / base", "none",
                           query(f"fleettune_forgetting_ratio{{{FED}}}", "{{federation}}"),
                           description="Above 1 the adapter made the model worse at general text."))
        .with_panel(series("Adapter norm", "none", query(f"fleettune_adapter_norm{{{FED}}}", "{{federation}}"),
                           description="Grows slowly and plateaus; explosive growth means instability."))
        .with_panel(Stat().title("Published version").datasource(PROMETHEUS).height(8).span(12)
                    .with_target(query(f"fleettune_adapter_version{{{FED}}}", "{{federation}}").ref_id("A")))
        .with_row(Row("Aggregation"))
        .with_panel(series("Privacy spent: cumulative epsilon (central DP)", "none",
                           query(f"fleettune_dp_epsilon{{{FED}}}", "{{federation}} total"),
                           query(f"fleettune_dp_epsilon_round{{{FED}}}", "{{federation}} per round"),
                           description="The federation completes before a round would pass its max_epsilon."))
        .with_panel(series("Exact LoRA: energy dropped by re-factorisation", "percentunit",
                           query(f"fleettune_truncation_energy_dropped{{{FED}}}", "{{federation}}"),
                           description="Share of the exact mean of B·A lost to the published rank; "
                                       "persistently high means the rank is too small."))
        .with_row(Row("Updates"))
        .with_panel(series(
            "Update norm p90, before and after clipping", "none",
            query(f"histogram_quantile(0.9, sum by (le, stage) (rate(fleettune_update_norm_bucket{{{FED}}}[{RATE}])))",
                  "p90 {{stage}}")))
        .with_panel(series(
            "Share of updates clipped (mean post/pre norm)", "percentunit",
            query(f"sum(rate(fleettune_update_norm_sum{{{FED},stage=\"post_clip\"}}[{RATE}])) / "
                  f"clamp_min(sum(rate(fleettune_update_norm_sum{{{FED},stage=\"pre_clip\"}}[{RATE}])), 1e-12)",
                  "post/pre")))
    )


def pipeline_health() -> Dashboard:
    return (
        base("fleettune / pipeline health", "fleettune-pipeline")
        .with_row(Row("Ingest"))
        .with_panel(series("Updates per second", "ops",
                           query(f"sum by (federation) (rate(fleettune_updates_received_total{{{FED}}}[{RATE}]))", "received {{federation}}"),
                           query(f"sum by (federation) (rate(fleettune_updates_accepted_total{{{FED}}}[{RATE}]))", "accepted {{federation}}")))
        .with_panel(series("Rejects by reason", "ops",
                           query(f"sum by (reason) (rate(fleettune_updates_rejected_total{{{FED}}}[{RATE}]))", "{{reason}}")))
        .with_panel(series("Bytes ingested", "Bps",
                           query(f"sum by (federation) (rate(fleettune_bytes_ingested_total{{{FED}}}[{RATE}]))", "{{federation}}")))
        .with_panel(series("Bytes per update by encoding, and per round", "bytes",
                           query(f"sum by (encoding) (rate(fleettune_update_bytes_sum{{{FED}}}[{RATE}])) / "
                                 f"sum by (encoding) (rate(fleettune_update_bytes_count{{{FED}}}[{RATE}]))", "per update {{encoding}}"),
                           query(f"sum by (federation) (increase(fleettune_bytes_ingested_total{{{FED}}}[1h])) / "
                                 f"sum by (federation) (increase(fleettune_rounds_total{{{FED},outcome=\"closed\"}}[1h]))",
                                 "per round {{federation}}"),
                           description="Compressed updates (update_encoding int8, int4, topk) should sit 4-13x "
                                       "below float32; per round: what a round's devices sent in all."))
        .with_panel(series("Redeliveries (deduplicated)", "ops",
                           query(f"rate(fleettune_messages_redelivered_total[{RATE}])", "redelivered")))
        .with_row(Row("Queues"))
        .with_panel(series("Queue depth", "short", query("fleettune_queue_depth", "{{queue}}")))
        .with_panel(series("Oldest waiting message", "s", query("fleettune_queue_oldest_age_seconds", "{{queue}}")))
        .with_row(Row("Rounds"))
        .with_panel(series("Rounds ended per hour", "short",
                           query(f"sum by (outcome) (increase(fleettune_rounds_total{{{FED}}}[1h]))", "{{outcome}}"),
                           query(f"sum by (reason) (increase(fleettune_round_failures_total{{{FED}}}[1h]))", "failed: {{reason}}")))
        .with_panel(series("Round duration and aggregation time (p90)", "s",
                           query(f"histogram_quantile(0.9, sum by (le) (rate(fleettune_round_duration_seconds_bucket{{{FED}}}[{RATE}])))", "round"),
                           query(f"histogram_quantile(0.9, sum by (le) (rate(fleettune_aggregation_seconds_bucket{{{FED}}}[{RATE}])))", "aggregation")))
        .with_panel(series("What the newest close read: partial sums, and updates no partial held", "short",
                           query(f"fleettune_close_partials{{{FED}}}", "partials {{federation}}"),
                           query(f"fleettune_close_updates_read{{{FED}}}", "updates read {{federation}}")))
        .with_row(Row("Async rounds (FedBuff)"))
        .with_panel(series("Buffer fill (publishes at 1)", "percentunit",
                           query(f"fleettune_buffer_fill{{{FED}}}", "{{federation}}")))
        .with_panel(series("Staleness of accepted updates (versions)", "short",
                           query(f"histogram_quantile(0.5, sum by (le) (rate(fleettune_update_staleness_bucket{{{FED}}}[{RATE}])))", "p50"),
                           query(f"histogram_quantile(0.9, sum by (le) (rate(fleettune_update_staleness_bucket{{{FED}}}[{RATE}])))", "p90"),
                           query(f"sum by (federation) (increase(fleettune_update_staleness_count{{{FED}}}[1h]))", "updates (1h) {{federation}}")))
        .with_panel(series("Versions published per minute", "short",
                           query(f"sum by (federation) (rate(fleettune_rounds_total{{{FED},outcome=\"closed\"}}[{RATE}])) * 60", "{{federation}}")))
    )


def fleet() -> Dashboard:
    return (
        base("fleettune / fleet", "fleettune-fleet")
        .with_row(Row("Devices"))
        .with_panel(series("Per-device training time by tier (p50, p90)", "s",
                           query(f"histogram_quantile(0.5, sum by (le, tier) (rate(fleettune_device_train_seconds_bucket{{{FED}}}[{RATE}])))", "p50 {{tier}}"),
                           query(f"histogram_quantile(0.9, sum by (le, tier) (rate(fleettune_device_train_seconds_bucket{{{FED}}}[{RATE}])))", "p90 {{tier}}")))
        .with_panel(series("Share of selected devices that timed out (1h)", "percentunit",
                           query(f"sum by (federation) (increase(fleettune_devices_timed_out_total{{{FED}}}[1h])) / "
                                 f"clamp_min(sum by (federation) (increase(fleettune_devices_selected_total{{{FED}}}[1h])), 1)",
                                 "{{federation}}")))
        .with_panel(series("Late updates (after their round closed)", "ops",
                           query(f"sum by (federation) (rate(fleettune_late_updates_total{{{FED}}}[{RATE}]))", "{{federation}}")))
        .with_panel(series("Current round", "short", query(f"fleettune_current_round{{{FED}}}", "{{federation}}")))
        .with_row(Row("Canary rollouts"))
        .with_panel(series("Rollout percentage (newest rollout) and serving version", "short",
                           query(f"fleettune_rollout_percent{{{FED}}}", "{{federation}} v{{version}} {{status}} %"),
                           query(f"fleettune_serving_version{{{FED}}}", "{{federation}} serving")))
        .with_panel(series("Device-reported evaluation loss, canary vs control", "none",
                           query(f'fleettune_rollout_reported{{{FED},metric="eval_loss"}}',
                                 "{{federation}} v{{version}} {{arm}}"),
                           description="Mean over devices (each counts once) at the rollout's last look"))
        .with_panel(series("Rollbacks (1h), by trigger", "short",
                           query(f"sum by (federation, trigger) (increase(fleettune_rollout_rollbacks_total{{{FED}}}[1h]))",
                                 "{{federation}} {{trigger}}")))
        .with_row(Row("Secure aggregation"))
        .with_panel(series("Refused stage answers and failed unmaskings (1h), by reason", "short",
                           query('label_replace(sum by (federation, reason) (increase(fleettune_secagg_refused_total'
                                 f'{{{FED}}}[1h])), "kind", "refused", "", "") or label_replace(sum by (federation, '
                                 f'reason) (increase(fleettune_secagg_failed_total{{{FED}}}[1h])), "kind", "failed", '
                                 '"", "")', "{{federation}} {{kind}} {{reason}}"),
                           description="Refused: forged keys, repeats, late answers; failed: too few shares "
                                       "(the attempt restarts) or a sum out of range (the round fails)"))
    )


DASHBOARDS = {"training-quality": training_quality, "pipeline-health": pipeline_health, "fleet": fleet}


def render() -> dict[str, str]:
    encoder = JSONEncoder(sort_keys=True, indent=2)
    return {name: encoder.encode(build().build()) + "\n" for name, build in DASHBOARDS.items()}


def expressions(dashboard_json: str) -> list[str]:
    """Every PromQL expression in a rendered dashboard (panel targets and variable queries)."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                found.append(node["expr"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(dashboard_json))
    return found


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for name, text in render().items():
        (OUT / f"{name}.json").write_text(text)
        print(f"wrote {OUT / (name + '.json')} ({len(expressions(text))} queries)")
