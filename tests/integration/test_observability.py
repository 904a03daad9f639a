"""Metrics under prefork, scraped by a real Prometheus during a real pipeline run.

Two `fleettune worker --metrics-port` processes (two pool processes each) and `fleettune api` run
against real Redis and S3; a real Prometheus scrapes them every second and loads the deploy alert
rules. Every PromQL expression of the dashboards and of the alert rules must return data.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import pytest
import yaml

from fleettune.shared.control import canary
from fleettune.shared.protocol import versions
from fleettune.shared.control.rollouts import Rollouts
from fleettune.shared.control.auth import Tokens
from fleettune.shared.federation import EvaluationConfig
from fleettune.shared.secagg.config import SecureAggregation
from fleettune.shared.secagg.messages import SecAggError
from fleettune.shared.strategies.config import AggregationConfig
from fleettune.workers.local import services
from tests.integration.conftest import make_pipeline
from tests.reference import random_deltas

pytestmark = pytest.mark.services
ROOT = Path(__file__).resolve().parents[2]
FLEETTUNE = str(Path(sys.executable).parent / "fleettune")


def _get(url: str, headers: dict[str, str] | None = None) -> str:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
        return response.read().decode()


def _wait_http(url: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            _get(url)
            return
        except OSError:
            assert time.monotonic() < end, f"{url} did not answer"
            time.sleep(0.2)


class Prometheus:
    def __init__(self, workdir: Path, targets: dict[str, list[str]], credentials: dict[str, Path] | None = None) -> None:
        exe = shutil.which("prometheus")
        assert exe, "prometheus is not installed (apt-get install prometheus; scripts/test.sh does)"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ROOT / "deploy" / "prometheus" / "rules.yml")],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": t}],
                                **({"authorization": {"credentials_file": str(credentials[job])}}
                                   if job in (credentials or {}) else {})} for job, t in targets.items()],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = services.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [exe, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=(workdir / "prometheus.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        _wait_http(f"{self.url}/-/ready")

    def query(self, expr: str) -> list[dict]:
        body = json.loads(_get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def stop(self) -> None:
        services._stop(self.proc)


@pytest.fixture(scope="module")
def observed(redis_url, s3_endpoint, tmp_path_factory):
    """A deployment with metrics on, a Prometheus on it, and a finished multi-round run."""
    workdir = tmp_path_factory.mktemp("observability")
    env = services.service_env(redis_url.rsplit("/", 1)[0] + "/5", s3_endpoint, bucket="fleettune-obs")
    ports = [services.free_port() for _ in range(3)]
    workers = [services.Worker(f"obs{i}", dict(env, FLEETTUNE_METRICS_PORT=str(port)), workdir,
                               beat=i == 0, via_cli=True) for i, port in enumerate(ports[:2])]
    api = subprocess.Popen([FLEETTUNE, "api", "--port", str(ports[2])], env=dict(os.environ, **env),
                           stdout=subprocess.DEVNULL, stderr=(workdir / "api.err").open("w"), start_new_session=True)
    _wait_http(f"http://127.0.0.1:{ports[2]}/healthz")
    pipeline = make_pipeline(env)
    key_file = workdir / "metrics-key"  # the API's /metrics takes an operator key, as deploy/prometheus does
    key_file.write_text(Tokens(pipeline.runtime.redis).create_api_key("read", "prometheus")[1])
    prometheus = Prometheus(workdir, {"workers": [f"127.0.0.1:{p}" for p in ports[:2]],
                                      "api": [f"127.0.0.1:{ports[2]}"]}, credentials={"api": key_file})
    try:
        run = _run(pipeline)
        time.sleep(4)  # a few more scrapes after the last change
        yield pipeline, prometheus, run, ports, {"Authorization": f"Bearer {key_file.read_text()}"}
    finally:
        prometheus.stop()
        services._stop(api)
        for w in workers:
            w.stop()


def _run(pipeline) -> dict:
    """Three evaluated rounds with a few bad updates, and a second federation whose round fails."""
    devices = [f"obs-{i}" for i in range(6)]
    good = pipeline.create(devices=devices + ["obs-bad"], max_rounds=3, max_update_norm=0.5,
                           evaluation=EvaluationConfig(base_model="tiny", eval_chars=3000))
    rng = np.random.default_rng(7)
    for round_no in (1, 2, 3):
        bad = random_deltas(good.spec.tensors, rng, 0.01)
        next(iter(bad.values())).flat[0] = np.nan
        pipeline.submit(good, round_no, "obs-bad", bad)  # rejected: non_finite (and it has reported)
        time.sleep(0.5)
        for device in devices:
            pipeline.submit(good, round_no, device, random_deltas(good.spec.tensors, rng, 0.002 * round_no),
                            num_samples=20)
        assert pipeline.wait_round(good, round_no).status == "closed"
    pipeline.submit(good, 1, devices[1], random_deltas(good.spec.tensors, rng, 0.01), base_version=0)  # late
    for preset in ("dp_fedavg", "flexlora"):  # what the epsilon and dropped-energy panels show
        other = pipeline.create(devices=["s-1", "s-2"], max_rounds=1, aggregation=AggregationConfig.preset(preset))
        for device in ("s-1", "s-2"):
            pipeline.submit(other, 1, device, random_deltas(other.spec.tensors, rng, 0.002))
        assert pipeline.wait_round(other, 1).status == "closed"
    # async rounds (the FedBuff panels): buffer 1 publishes; a stale update half fills buffer 2
    buffered = pipeline.create(devices=["a-1", "a-2", "a-3"], mode="async", buffer_size=2, min_updates=1,
                               timeout_seconds=3600, max_rounds=5)
    for device in ("a-1", "a-2"):
        pipeline.submit(buffered, 1, device, random_deltas(buffered.spec.tensors, rng, 0.002))
    assert pipeline.wait_round(buffered, 1).status == "closed"
    pipeline.submit(buffered, 1, "a-3", random_deltas(buffered.spec.tensors, rng, 0.002))
    pipeline.wait_received(buffered.name, 3)
    # secure aggregation (its panel): keys from a device with no registered identity are refused by name
    setting = SecureAggregation()
    secure = pipeline.create(devices=["sa-1", "sa-2"], max_rounds=1, aggregation=AggregationConfig(
        secure_aggregation=setting))
    pipeline.runtime.coordinator.secure.ensure(secure.name, 1, setting)
    with pytest.raises(SecAggError, match="unknown_identity"):
        pipeline.runtime.coordinator.secure.receive(secure.name, 1, "sa-1", "advertise", msgpack.packb(
            {"attempt": 1, "device": "sa-1", "c_pk": b"c" * 32, "s_pk": b"s" * 32, "sig": b"x" * 64}), setting)
    failing = pipeline.create(devices=["slow-1", "slow-2", "slow-3"], min_updates=3, timeout_seconds=2, max_rounds=1)
    pipeline.submit(failing, 1, "slow-1", random_deltas(failing.spec.tensors, rng, 0.01))
    assert pipeline.wait_round(failing, 1, timeout=30).status == "failed"
    end = time.monotonic() + 120
    while pipeline.runtime.state.evaluations.evaluation(good.name, 3) is None:
        assert time.monotonic() < end, "version 3 was not evaluated"
        time.sleep(0.2)
    pipeline.wait_received(good.name, 3 + 18 + 1)
    _canary(pipeline.runtime.state, good.name)
    return {"good": good, "failing": failing}


def _canary(state, fed: str) -> None:
    """A rollout of version 3 to half the devices, with reports from both arms (the rollout panels)."""
    rollouts = Rollouts(state)
    gates = canary.Gates(max_perplexity_ratio=100, min_reports=5)  # random deltas: only the metrics matter here
    rec = rollouts.create(fed, 3, [], 50, 10, 3600, True, gates, "tests", published=lambda v: True)
    rollouts.start(fed, rec["id"], "tests", lambda v: state.evaluations.evaluation(fed, v))
    rng = np.random.default_rng(3)
    for i in range(40):
        got = rollouts.assignment(fed, f"user-{i}", ())
        rollouts.report(fed, f"user-{i}", (), got.version, {"eval_loss": float(rng.normal(3.0, 0.1))})
    assert rollouts.get(fed, rec["id"])["arms"]["canary"]["devices"] >= 5


def test_worker_and_api_endpoints_pass_promtool(observed):
    _, _, _, ports, auth = observed
    for port in ports:
        text = _get(f"http://127.0.0.1:{port}/metrics", auth if port == ports[2] else None)
        check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    assert "fleettune_updates_accepted_total" in _get(f"http://127.0.0.1:{ports[0]}/metrics")
    assert "fleettune_api_requests_total" in _get(f"http://127.0.0.1:{ports[2]}/metrics", auth)


def test_counters_summed_across_pool_processes_agree_with_the_pipelines_accounting(observed):
    pipeline, prom, run, _, _ = observed
    fed = run["good"].name
    stats = pipeline.runtime.state.federations.stats(fed)
    accepted = prom.value(f'sum(fleettune_updates_accepted_total{{federation="{fed}"}})')
    rejected = prom.value(f'sum(fleettune_updates_rejected_total{{federation="{fed}"}})')
    received = prom.value(f'sum(fleettune_updates_received_total{{federation="{fed}"}})')
    assert (accepted, rejected, received) == (stats["accepted"], stats["rejected"], stats["received"])
    assert accepted + rejected == received == 22
    assert prom.value(f'sum(fleettune_updates_rejected_total{{federation="{fed}",reason="non_finite"}})') == 3
    assert prom.value(f'sum(fleettune_late_updates_total{{federation="{fed}"}})') == 1


def test_adapter_norm_perplexity_and_training_time_are_the_recorded_values(observed):
    pipeline, prom, run, _, _ = observed
    fed = run["good"].name
    manifest = versions.manifest(pipeline.runtime.store, fed, 3)
    evaluation = pipeline.runtime.state.evaluations.evaluation(fed, 3)
    assert prom.value(f'max(fleettune_adapter_norm{{federation="{fed}"}})') == pytest.approx(manifest["global_norm"])
    assert prom.value(f'max(fleettune_adapter_version{{federation="{fed}"}})') == 3
    assert prom.value(f'max(fleettune_heldout_perplexity{{federation="{fed}"}})') == pytest.approx(evaluation["heldout_mean"])
    assert prom.value(f'max(fleettune_forgetting_ratio{{federation="{fed}"}})') == pytest.approx(evaluation["forgetting_ratio"])
    # every accepted envelope said train_seconds=1.5 (tests/integration/conftest.py)
    assert prom.value(f'sum(fleettune_device_train_seconds_count{{federation="{fed}"}})') == 18
    assert prom.value(f'sum(fleettune_device_train_seconds_sum{{federation="{fed}"}})') == pytest.approx(27.0)
    failing = run["failing"].name
    assert prom.value(f'sum(fleettune_round_failures_total{{federation="{failing}",reason="no_quorum"}})') == 1
    assert prom.value(f'sum(fleettune_devices_timed_out_total{{federation="{failing}"}})') == 2


def _dashboard_expressions() -> list[str]:
    sys.path.insert(0, str(ROOT / "deploy" / "grafana"))
    try:
        import dashboards
    finally:
        sys.path.pop(0)
    return [e for text in dashboards.render().values() for e in dashboards.expressions(text)]


def test_every_dashboard_query_returns_data(observed):
    _, prom, _, _, _ = observed
    expressions = _dashboard_expressions()
    assert len(expressions) >= 20
    empty = [e for e in expressions
             if not prom.query(e.replace("$federation", ".*").replace("$__rate_interval", "1m"))]
    assert empty == []
    values = json.loads(_get(f"{prom.url}/api/v1/label/federation/values"))["data"]  # the $federation variable
    assert len(values) >= 2


def test_every_alert_signal_returns_data_and_the_rules_load(observed):
    _, prom, _, _, _ = observed
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yml").read_text())["groups"][0]["rules"]
    assert len(rules) == 14
    for rule in rules:
        signal = re.split(r"\s[<>]=?\s*[0-9.e+-]+\s*$", rule["expr"].strip())[0]
        assert prom.query(signal), f"{rule['alert']}: no data for {signal}"
    loaded = json.loads(_get(f"{prom.url}/api/v1/rules"))["data"]["groups"][0]["rules"]
    assert {r["name"] for r in loaded} == {r["alert"] for r in rules}
    assert all(r["health"] == "ok" for r in loaded)


def test_the_committed_dashboards_are_what_the_code_generates():
    sys.path.insert(0, str(ROOT / "deploy" / "grafana"))
    try:
        import dashboards
    finally:
        sys.path.pop(0)
    for name, text in dashboards.render().items():
        assert (ROOT / "deploy" / "grafana" / "dashboards" / f"{name}.json").read_text() == text, name


def test_the_api_answers_with_federation_state(observed):
    pipeline, _, run, ports, _ = observed
    fed = run["good"].name
    read_key = Tokens(pipeline.runtime.redis).create_api_key("read", "observability")[1]
    auth = {"Authorization": f"Bearer {read_key}"}
    body = json.loads(_get(f"http://127.0.0.1:{ports[2]}/api/v1/federations/{fed}", auth))
    assert body["status"] == "completed" and body["stats"]["accepted"] == 18
    manifest = json.loads(_get(f"http://127.0.0.1:{ports[2]}/api/v1/federations/{fed}/versions/3", auth))
    assert manifest["version"] == 3 and manifest["evaluation"]["heldout_mean"] > 0
    with pytest.raises(urllib.error.HTTPError) as err:
        _get(f"http://127.0.0.1:{ports[2]}/api/v1/federations/nope", auth)
    assert err.value.code == 404
