"""The deploy manifests pass the best validators installable here (no container engine runs here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent


def _run(*args: str, cwd: Path = DEPLOY) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_prometheus_config_and_rules_pass_promtool(tmp_path):
    for name in ("prometheus.yml", "rules.yml"):  # beside the API key file an operator creates (promtool reads it)
        (tmp_path / name).write_text((DEPLOY / "prometheus" / name).read_text())
    (tmp_path / "api-key").write_text("ftk_0000000000000000_placeholder")
    _run("promtool", "check", "config", str(tmp_path / "prometheus.yml"))
    _run("promtool", "check", "rules", "prometheus/rules.yml")


def test_each_alert_fires_and_stays_quiet_when_it_should():
    _run("promtool", "test", "rules", "rules_test.yml", cwd=DEPLOY / "prometheus")
    tested = yaml.safe_load((DEPLOY / "prometheus" / "rules_test.yml").read_text())["tests"]
    alerts = {r["alert"] for r in yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())["groups"][0]["rules"]}
    fired = {t["alertname"] for test in tested for t in test["alert_rule_test"] if t["exp_alerts"]}
    assert fired == alerts


def test_kubernetes_prometheus_config_passes_promtool(tmp_path):
    text = yaml.safe_load((DEPLOY / "k8s" / "prometheus-config.yaml").read_text())["data"]["prometheus.yml"]
    config = yaml.safe_load(text)
    config["rule_files"] = [str(DEPLOY / "prometheus" / "rules.yml")]
    for job in config["scrape_configs"]:  # the Secret's mount, here a file of its own
        if "authorization" in job:
            (tmp_path / "api-key").write_text("ftk_0000000000000000_placeholder")
            job["authorization"]["credentials_file"] = str(tmp_path / "api-key")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    _run("promtool", "check", "config", str(tmp_path / "prometheus.yml"))


def test_compose_file_matches_the_compose_spec():
    _run(str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "compose.yaml")
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    assert {"redis", "minio", "minio-setup", "api", "worker", "beat", "prometheus", "grafana"} <= services.keys()
    assert "noeviction" in services["redis"]["command"] and "--appendonly" in services["redis"]["command"]
    assert not any("--beat" in s.get("command", []) for s in services.values())  # beat runs on its own
    assert services["beat"]["command"] == ["fleettune", "beat"] and services["beat"]["deploy"]["replicas"] == 2


def test_kubernetes_manifests_validate_strictly():
    _run(str(BIN / "kubernetes-validate"), "--strict", "--quiet", *sorted(str(p) for p in (DEPLOY / "k8s").glob("*.yaml")))


def test_grafana_provisioning_points_at_the_dashboards_datasource():
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    for path in (DEPLOY / "grafana" / "dashboards").glob("*.json"):
        text = path.read_text()
        assert json.loads(text)["uid"].startswith("fleettune-")
        assert f'"uid": "{uid}"' in text


def test_the_server_s3_policy_grants_only_the_bucket():
    policy = json.loads((DEPLOY / "minio" / "server-policy.json").read_text())
    resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
    assert resources == {"arn:aws:s3:::fleettune", "arn:aws:s3:::fleettune/*"}
    actions = {a for statement in policy["Statement"] for a in statement["Action"]}
    assert not any(a.startswith("admin:") or a == "s3:*" for a in actions)


def test_redis_acl_users_agree_between_compose_and_kubernetes():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["redis"]["command"]
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "redis.yaml").read_text()))
    k8s = docs[0]["spec"]["template"]["spec"]["containers"][0]["args"]

    def rules(args: list[str]) -> list[str]:
        return [w for w in args[args.index("--user"):] if not w.startswith(">")]

    assert rules(compose) == rules(k8s)
