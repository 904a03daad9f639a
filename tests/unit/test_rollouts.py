"""Device groups, cascading tiers and canary rollouts on the gateway, over fakeredis."""

from __future__ import annotations

import random

import fakeredis
import pytest

from fleettune.shared import keys
from fleettune.shared.control import canary
from fleettune.shared.control.gateway import Gateway
from fleettune.shared.control.groups import GroupSpec, Rules
from fleettune.shared.control.presign import LocalPresigner
from fleettune.shared.control.rollouts import Rollouts
from fleettune.shared.control.schemas import GroupIn, ReportIn
from fleettune.shared.control.tiers import Deployment, Variant
from fleettune.shared.errors import Refusal
from fleettune.shared.protocol.adapter_spec import LAYOUTS
from fleettune.shared.federation import DeviceProfile, FederationConfig
from fleettune.shared.settings import Settings
from fleettune.shared.state import FederationState
from tests.unit.test_control import Clock

EVALS = {0: None, 1: {"heldout_mean": 20.0, "base_heldout_mean": 21.0, "forgetting_ratio": 1.01},
         2: {"heldout_mean": 19.5, "base_heldout_mean": 21.0, "forgetting_ratio": 1.02}}


@pytest.fixture
def plane():
    clock = Clock()
    state = FederationState(fakeredis.FakeRedis())
    state.federations.create(FederationConfig("f", LAYOUTS["tiny-llama"]), status="idle")
    gateway = Gateway(state, LocalPresigner(b"k" * 32, clock), Settings(), lambda raw, at: None, clock)
    return state, gateway, clock


def _serve(gateway: Gateway, profile: DeviceProfile) -> dict:
    """What a device runs; with no open round a training tier's refusal carries it."""
    try:
        return gateway.check_in("f", profile, "http://api")["serve"]
    except Refusal as refused:
        assert refused.code == "no_open_round"
        return refused.extra["serve"]


def _rollout(rollouts: Rollouts, version: int = 1, start: float = 10.0, step: float = 30.0, **gates) -> dict:
    rec = rollouts.create("f", version, [], start, step, 0.0, True, canary.Gates(**gates), "alice",
                          published=lambda v: v in EVALS)
    return rollouts.start("f", rec["id"], "alice", EVALS.get)


def test_buckets_are_uniform_within_2_percent_at_10000_devices_and_sticky():
    devices = [f"dev-{i}" for i in range(10_000)]
    for percent in (1, 10, 25, 50, 90):
        share = sum(canary.in_canary("ro-a", d, percent) for d in devices) / len(devices) * 100
        assert abs(share - percent) <= 2, (percent, share)
    # sticky and monotone: raising the percentage only moves devices into the canary
    at10 = {d for d in devices if canary.in_canary("ro-a", d, 10)}
    at30 = {d for d in devices if canary.in_canary("ro-a", d, 30)}
    assert at10 < at30 and at10 == {d for d in devices if canary.in_canary("ro-a", d, 10)}
    # another rollout draws other canaries
    other = {d for d in devices if canary.in_canary("ro-b", d, 10)}
    assert len(at10 & other) < 0.2 * len(at10)


def test_check_ins_assign_the_same_version_every_time(plane):
    state, gateway, _ = plane
    rec = _rollout(gateway.rollouts, start=20)
    served = {}
    for attempt in range(3):
        for i in range(200):
            serve = _serve(gateway, DeviceProfile(f"d{i}"))
            served.setdefault(f"d{i}", set()).add((serve["version"], serve["arm"]))
    assert all(len(v) == 1 for v in served.values())
    canaries = [d for d, v in served.items() if v == {(1, "canary")}]
    # 20 % of 200 is 40 +- 5.7 (binomial); the rollout id is random, so allow 5 standard deviations
    assert 12 <= len(canaries) <= 68 and all(v in ({(1, "canary")}, {(0, "control")}) for v in served.values())
    assert rec["status"] == "active" and rec["percent"] == 20


def test_the_server_evaluation_gate_comes_before_any_device(plane):
    state, gateway, _ = plane
    rollouts = gateway.rollouts
    evals = {0: None, 1: None}
    rec = rollouts.create("f", 1, [], 10, 10, 0, True, canary.Gates(), "alice", published=lambda v: True)
    with pytest.raises(Refusal) as refused:
        rollouts.start("f", rec["id"], "alice", evals.get)
    assert refused.value.code == "evaluation_pending"
    worse = {1: {"heldout_mean": 23.0, "base_heldout_mean": 21.0}}
    with pytest.raises(Refusal) as refused:
        rollouts.start("f", rec["id"], "alice", worse.get)
    assert refused.value.code == "server_gate_failed" and "1.095x" in refused.value.detail
    forgets = {1: {"heldout_mean": 20.0, "base_heldout_mean": 21.0, "forgetting_ratio": 1.4}}
    with pytest.raises(Refusal, match="forgetting ratio"):
        rollouts.start("f", rec["id"], "alice", forgets.get)
    assert rollouts.get("f", rec["id"])["status"] == "pending"
    with pytest.raises(Refusal) as refused:  # one live rollout per federation
        rollouts.create("f", 2, [], 10, 10, 0, True, canary.Gates(), "bob", published=lambda v: True)
    assert refused.value.code == "rollout_in_progress"


def test_every_transition_is_recorded_with_who_and_why(plane):
    _, gateway, clock = plane
    rollouts = gateway.rollouts
    rec = _rollout(rollouts)
    clock.now += 1
    rec = rollouts.advance("f", rec["id"], "bob", "looks fine")
    assert rec["percent"] == 40
    rec = rollouts.pause("f", rec["id"], "carol", "weekend")
    with pytest.raises(Refusal) as refused:
        rollouts.advance("f", rec["id"], "bob")
    assert refused.value.code == "invalid_transition"
    rec = rollouts.resume("f", rec["id"], "carol")
    rec = rollouts.set_percent("f", rec["id"], 5, "a customer complaint", "dave")
    assert rec["percent"] == 5
    rec = rollouts.promote("f", rec["id"], "erin")
    assert (rec["status"], rec["percent"], rollouts.serving("f"), rollouts.live("f")) == ("completed", 100, 1, None)
    assert [(h["action"], h["by"], h["to_percent"]) for h in rec["history"]] == [
        ("create", "alice", 0), ("start", "alice", 10), ("advance", "bob", 40), ("pause", "carol", 40),
        ("resume", "carol", 40), ("set_percent", "dave", 5), ("promote", "erin", 100)]
    assert rec["history"][5]["reason"] == "a customer complaint"
    with pytest.raises(Refusal, match="invalid_transition"):
        rollouts.rollback("f", rec["id"], "bob")


def _report_all(gateway: Gateway, n: int, loss_of, rng: random.Random) -> dict:
    """Each device checks in, then reports the loss of the version it serves."""
    last, canaries = {}, 0
    for i in range(n):
        serve = _serve(gateway, DeviceProfile(f"d{i}"))
        canaries += serve["arm"] == "canary"
        last = gateway.report("f", f"d{i}", serve["version"], {"eval_loss": loss_of(serve["version"], rng)})
        if last["rollout_status"] != "active":
            return dict(last, reports=i + 1, canary_reports=canaries)
    return dict(last, reports=n, canary_reports=canaries)


def test_a_bad_version_is_rolled_back_automatically_from_device_reports(plane):
    state, gateway, _ = plane
    rec = _rollout(gateway.rollouts, min_reports=5)
    rng = random.Random(0)
    out = _report_all(gateway, 400, lambda v, r: r.gauss(3.0 if v == 0 else 3.6, 0.15), rng)
    rec = gateway.rollouts.get("f", rec["id"])
    assert rec["status"] == "rolled_back" and rec["percent"] == 0 and rec["history"][-1]["by"] == "auto"
    # bounded check-ins: the canary share is random per rollout id, so bound the canary's own reports
    assert "eval_loss" in rec["history"][-1]["reason"] and out["canary_reports"] <= 20
    assert state.r.hget(keys.fed_stats("f"), "rollbacks:auto") == b"1"
    assert _serve(gateway, DeviceProfile("d1"))["version"] == 0  # everyone back


def test_user_facing_errors_alone_roll_a_version_back(plane):
    """Same loss, but the candidate fails 10 % of requests where the serving version fails 1 %."""
    _, gateway, _ = plane
    rec = _rollout(gateway.rollouts, min_reports=5)
    rng = random.Random(4)
    for i in range(400):
        serve = _serve(gateway, DeviceProfile(f"d{i}"))
        errors = sum(rng.random() < (0.10 if serve["version"] == 1 else 0.01) for _ in range(100))
        out = gateway.report("f", f"d{i}", serve["version"], {"eval_loss": rng.gauss(3.0, 0.1),
                                                               "error_rate": errors / 100})
        if out["rollout_status"] != "active":
            break
    rec = gateway.rollouts.get("f", rec["id"])
    assert rec["status"] == "rolled_back" and "error_rate" in rec["history"][-1]["reason"]
    breached = [c["metric"] for c in rec["comparisons"] if c["breached"]]
    # the error rate breaches; eval_loss (equal in both arms) may too, as a false positive at the gates'
    # alpha (0.05): arms are hashed from a random rollout id, so which devices land where varies by run
    assert "error_rate" in breached


def test_a_good_version_advances_to_100_and_becomes_the_serving_version(plane):
    _, gateway, clock = plane
    rec = _rollout(gateway.rollouts, min_reports=5)
    rng = random.Random(1)
    for _ in range(20):
        out = _report_all(gateway, 300, lambda v, r: r.gauss(3.0 if v == 0 else 2.95, 0.15), rng)
        clock.now += 1
        if out["rollout_status"] == "completed":
            break
    rec = gateway.rollouts.get("f", rec["id"])
    assert rec["status"] == "completed" and rec["percent"] == 100 and gateway.rollouts.serving("f") == 1
    assert [h["to_percent"] for h in rec["history"] if h["action"] == "advance"] == [40, 70, 100]


def test_a_step_waits_its_minimum_time_and_the_beat_advances_it_after(plane):
    _, gateway, clock = plane
    rec = gateway.rollouts.create("f", 1, [], 10, 30, 60, True, canary.Gates(min_reports=5), "alice",
                                  published=lambda v: True)
    gateway.rollouts.start("f", rec["id"], "alice", EVALS.get)
    rng = random.Random(3)
    _report_all(gateway, 300, lambda v, r: r.gauss(3.0 if v == 0 else 2.8, 0.1), rng)
    assert gateway.rollouts.get("f", rec["id"])["percent"] == 10  # the evidence is in; the time is not
    clock.now += 61
    assert gateway.rollouts.tick("f")["percent"] == 40  # what beat's sweep does for every federation
    assert gateway.rollouts.tick("f")["percent"] == 40  # and only once per step


def test_a_step_that_no_gate_decides_pauses_as_inconclusive_and_a_resume_gets_its_time_again(plane):
    """Too few devices for min_reports: no comparison, so neither a rollback nor an advance."""
    _, gateway, clock = plane
    rec = gateway.rollouts.create("f", 1, [], 10, 30, 60, True, canary.Gates(min_reports=50), "alice",
                                  published=lambda v: True, max_step_seconds=600)
    gateway.rollouts.start("f", rec["id"], "alice", EVALS.get)
    rng = random.Random(5)
    _report_all(gateway, 100, lambda v, r: r.gauss(3.0, 0.1), rng)
    clock.now += 599
    assert gateway.rollouts.tick("f")["status"] == "active"
    clock.now += 1
    rec = gateway.rollouts.tick("f")  # what beat's sweep does
    assert (rec["status"], rec["percent"]) == ("paused", 10)
    last = rec["history"][-1]
    assert (last["by"], last["action"]) == ("auto", "pause") and last["reason"].startswith("inconclusive")
    assert "fewer than 50 reports" in last["reason"]
    # paused keeps each device's arm; nothing counts as a rollback
    assert {_serve(gateway, DeviceProfile(f"d{i}"))["version"] for i in range(100)} == {0, 1}
    assert gateway.rollouts.resume("f", rec["id"], "alice", "wait a day more")["status"] == "active"
    assert gateway.rollouts.tick("f")["status"] == "active"
    clock.now += 600
    assert gateway.rollouts.tick("f")["status"] == "paused"


def test_without_a_deadline_an_undecided_step_waits(plane):
    _, gateway, clock = plane
    rec = gateway.rollouts.create("f", 1, [], 10, 30, 60, True, canary.Gates(min_reports=50), "alice",
                                  published=lambda v: True)
    gateway.rollouts.start("f", rec["id"], "alice", EVALS.get)
    clock.now += 365 * 24 * 3600
    assert gateway.rollouts.tick("f")["status"] == "active"


def test_noise_alone_never_rolls_back(plane):
    """Equal versions: never evidence of harm. They are within the 0.05-nat margin, so they may
    advance once enough devices have shown it, but a handful of noisy reports moves nothing."""
    _, gateway, clock = plane
    rec = _rollout(gateway.rollouts, min_reports=5)
    rng = random.Random(2)
    first = _report_all(gateway, 20, lambda v, r: r.gauss(3.0, 0.3), rng)
    assert (first["rollout_status"], first["percent"]) == ("active", 10)  # 2 or so canaries: nothing to go on
    for _ in range(5):
        clock.now += 1
        if _report_all(gateway, 300, lambda v, r: r.gauss(3.0, 0.3), rng)["rollout_status"] != "active":
            break
    rec = gateway.rollouts.get("f", rec["id"])
    assert rec["status"] in ("active", "completed") and rec["looks"] >= 3
    assert not any(c["breached"] for c in rec["comparisons"])
    assert all(h["by"] != "auto" or h["action"] == "advance" for h in rec["history"])


def test_reports_are_bounded_validated_and_must_match_the_assignment(plane):
    _, gateway, _ = plane
    with pytest.raises(Refusal, match="no_active_rollout"):
        gateway.report("f", "d1", 0, {"eval_loss": 3.0})
    _rollout(gateway.rollouts, start=100)
    with pytest.raises(Refusal, match="not_assigned"):
        gateway.report("f", "d1", 0, {"eval_loss": 3.0})
    for bad in ({"version": 1}, {"version": 1, "errors": 3}, {"version": 1, "requests": 2, "errors": 3},
                {"version": 1, "eval_loss": 1.0, "perplexity": 3.0}):
        with pytest.raises(Refusal, match="invalid_report"):
            ReportIn(**bad).values()
    for bad in ({"version": 1, "eval_loss": float("nan")}, {"version": 1, "acceptance_rate": 1.5},
                {"version": -1, "eval_loss": 1.0}, {"version": 1, "eval_loss": 1.0, "extra": 1}):
        with pytest.raises(ValueError):
            ReportIn(**bad)
    assert ReportIn(version=1, requests=10, errors=1).values() == {"error_rate": 0.1}


def test_dynamic_groups_follow_what_a_device_declares_at_each_check_in(plane):
    state, gateway, _ = plane
    groups = gateway.groups
    groups.put("f", "big", GroupIn(rules={"min_ram_mb": 4000, "os": ["android"]}).to_spec(), [])
    groups.put("f", "beta", GroupIn(devices=["vip"], rules={"min_app_version": "2.1"}).to_spec(), ["vip"])
    groups.put("f", "listed", GroupSpec("static", exclude=("nope",)), ["a", "nope"])
    assert groups.get("f", "beta")["kind"] == "hybrid" and groups.get("f", "big")["kind"] == "dynamic"
    phone = DeviceProfile("a", ram_mb=3000, os="android", app_version="2.0.9")
    assert _serve(gateway, phone)["version"] == 0
    assert groups.evaluate("f", phone) == {"listed"}
    upgraded = DeviceProfile("a", ram_mb=6000, os="android", app_version="2.10")
    assert groups.evaluate("f", upgraded) == {"big", "beta", "listed"}
    assert groups.get("f", "big")["matched"] == ["a"]
    assert groups.evaluate("f", DeviceProfile("a", ram_mb=6000, os="ios")) == {"listed"}
    assert groups.get("f", "big")["matched"] == []  # it left the group at its check-in
    assert groups.evaluate("f", DeviceProfile("vip")) == {"beta"}  # listed in the hybrid group
    assert groups.evaluate("f", DeviceProfile("nope")) == set()  # excluded
    assert Rules(min_app_version="1.0").mismatch(DeviceProfile("x", app_version="garbage")) is not None
    with pytest.raises(Refusal, match="invalid_group"):
        GroupIn(kind="static", rules={"min_ram_mb": 1}).to_spec()


def test_a_rollout_reaches_only_its_target_groups(plane):
    _, gateway, _ = plane
    gateway.groups.put("f", "android", GroupIn(rules={"os": ["android"]}).to_spec(), [])
    rec = gateway.rollouts.create("f", 1, ["android"], 100, 10, 0, True, canary.Gates(), "alice",
                                  published=lambda v: True)
    gateway.rollouts.start("f", rec["id"], "alice", EVALS.get)
    assert _serve(gateway, DeviceProfile("a", os="android"))["version"] == 1
    serve = _serve(gateway, DeviceProfile("b", os="ios"))
    assert (serve["version"], serve["arm"]) == (0, None)


def test_each_tier_gets_its_variant_at_check_in(plane):
    state, gateway, _ = plane
    deployment: Deployment = gateway.deployment
    deployment.put("f", {"flagship": Variant(), "mid": Variant("infer", "tiny", "distilled"),
                         "iot": Variant("api", api_url="https://api.example/v1/generate")})
    refused = None
    try:
        gateway.check_in("f", DeviceProfile("p", tier="flagship"), "http://api")
    except Refusal as exc:  # a training tier with no open round is told so, and what to serve
        refused = exc
    assert refused.code == "no_open_round" and refused.extra["serve"]["mode"] == "train"
    mid = gateway.check_in("f", DeviceProfile("m", tier="mid"), "http://api")
    assert (mid["action"], mid["serve"]["base_model"], mid["serve"]["adapter"]) == ("infer", "tiny", None)
    deployment.record_distilled("f", "mid", 0)
    adapter = gateway.check_in("f", DeviceProfile("m", tier="mid"), "http://api")["serve"]["adapter"]
    assert adapter["kind"] == "distilled" and "/tier-mid/adapter_model.safetensors" in \
        adapter["download"]["adapter_model.safetensors"]["url"]
    iot = gateway.check_in("f", DeviceProfile("i", tier="iot"), "http://api")
    assert (iot["action"], iot["serve"]["api_url"]) == ("api", "https://api.example/v1/generate")
    assert state.r.scard(keys.fed_devices("f")) == 0  # tiers that do not train never join a cohort
