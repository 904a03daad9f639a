"""The README's main job, `fleettune demo`, run as a user would: no servers, no configuration."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from fleettune.shared.protocol import versions


def _demo(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`fleettune demo ARGS` as a user runs it: the installed command, no FLEETTUNE_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETTUNE_")}
    done = subprocess.run([str(Path(sys.executable).parent / "fleettune"), "demo", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_the_demo_trains_federates_and_leaves_a_loadable_adapter_and_a_plot(tmp_path):
    out = tmp_path / "demo"
    done = _demo("--devices", "6", "--rounds", "2", "--out", str(out), "--formats", "onnx,executorch,tflite,coreml",
                 timeout=900)

    table = [line.split() for line in done.stdout.splitlines() if line.strip()[:1].isdigit() and
             line.split()[1] in ("base", "closed")]
    assert [row[:2] for row in table] == [["0", "base"], ["1", "closed"], ["2", "closed"]]
    heldout = [float(row[4]) for row in table]
    assert heldout[2] < heldout[0]  # federated training lowered held-out perplexity
    assert all(row[3] == "1" for row in table[1:])  # each round's NaN update was rejected
    assert "old-phone at check-in: 403 ineligible: ram_mb" in done.stdout  # the device filter, at the gateway
    assert (out / "perplexity.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "final-adapter" / versions.ADAPTER_FILE).stat().st_size > 100_000
    assert "loads with PeftModel.from_pretrained" in done.stdout
    # --formats: the final version for on-device runtimes, one line per format (tflite is litert)
    lines = dict(re.findall(r"^format (\w+): (.*)$", done.stdout, re.M))
    assert sorted(lines) == ["coreml", "executorch", "litert", "onnx"], done.stdout[-3000:]
    for fmt in ("onnx", "executorch", "litert"):
        diff, base, adapter = re.fullmatch(r"max \|logit diff\| (\S+), base (\d+) bytes, adapter (\d+) bytes",
                                           lines[fmt]).groups()
        assert float(diff) <= 1e-3 and int(base) > 10 * int(adapter)
    assert lines["coreml"].startswith("max |logit diff| n/a, base ")
    assert re.search(r"^\(coreml: Core ML runs only on Apple platforms.*base weights unchanged\)$", done.stdout, re.M)


def test_the_demo_refuses_a_format_it_does_not_know():
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETTUNE_")}
    done = subprocess.run([str(Path(sys.executable).parent / "fleettune"), "demo", "--formats", "onnx,tensorrt"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "'tensorrt' is none of" in done.stderr


def test_the_canary_demo_advances_the_good_version_and_rolls_the_bad_one_back(tmp_path):
    done = _demo("--canary", "--out", str(tmp_path / "canary"), timeout=600)

    good, bad = done.stdout.split("(the bad version)")
    assert "completed   100.0%" in good and "409 server_gate_failed" in good
    assert "rolled_back   0.0%" in bad and "rollback by auto: gate breached: eval_loss" in bad
    assert done.stdout.rstrip().splitlines()[-1].startswith("serving version now: 2;")


def test_the_split_demo_trains_through_the_split_server_with_dp_and_beats_the_base(tmp_path):
    done = _demo("--split", "--epsilon", "8", "--steps", "60", "--out", str(tmp_path / "split"))

    last = done.stdout.rstrip().splitlines()[-1]
    match = re.fullmatch(r"split learning: epsilon ([\d.]+), held-out perplexity ([\d.]+) \(base ([\d.]+), "
                         r"non-private ([\d.]+)\)", last)
    assert match, last
    epsilon, private, base, plain = map(float, match.groups())
    assert 7.0 < epsilon <= 8.0  # the accountant's, for the steps taken, within the asked budget
    assert plain < private < base  # DP costs something, and still beats the untrained base


def test_the_async_demo_publishes_a_version_per_buffer_with_stale_updates_and_beats_the_base(tmp_path):
    done = _demo("--async", "--devices", "6", "--rounds", "2", "--buffer", "3", "--out", str(tmp_path / "async"))

    last = done.stdout.rstrip().splitlines()[-1]
    match = re.fullmatch(r"async rounds: (\d+) versions from (\d+) updates in [\d,]+ simulated s; held-out "
                         r"perplexity ([\d.]+) \(base ([\d.]+)\); done in \d+s", last)
    assert match, last
    published, updates, ppl, base = int(match[1]), int(match[2]), float(match[3]), float(match[4])
    assert updates == 12 and published == 4 and ppl < base  # a version per 3 accepted updates, and it learns
    stale = [float(line.split()[3]) for line in done.stdout.splitlines() if re.match(r"\s+[1-9]\d* +\d+ +3 ", line)]
    assert len(stale) == published and max(stale) > 0  # slow devices' updates joined later buffers


def test_the_compressed_demo_sends_a_quarter_of_the_bytes_and_learns_as_much(tmp_path):
    done = _demo("--compress", "int8", "--devices", "4", "--rounds", "2", "--out", str(tmp_path / "int8"))

    last = done.stdout.rstrip().splitlines()[-1]
    match = re.fullmatch(r"update bytes: float32 ([\d,]+), sent ([\d,]+) \(F/S = ([\d.]+)×\); held-out perplexity "
                         r"([\d.]+) vs ([\d.]+) uncompressed", last)
    assert match, last
    dense, sent = (int(match[i].replace(",", "")) for i in (1, 2))
    ppl, reference = float(match[4]), float(match[5])
    assert dense / sent >= 3.8 and abs(ppl / reference - 1) <= 0.01  # the int8 goal, on the demo


def test_the_secure_aggregation_demo_publishes_plain_fedavg_within_the_bound_with_a_device_gone(tmp_path):
    done = _demo("--secure-aggregation", "--devices", "5", "--rounds", "2", "--out", str(tmp_path / "secure"))

    table = [line.split() for line in done.stdout.splitlines() if line.strip()[:1].isdigit() and
             line.split()[1] in ("base", "closed")]
    assert [row[:3] for row in table] == [["0", "base", "0"], ["1", "closed", "4"], ["2", "closed", "4"]]
    assert float(table[2][4]) < float(table[0][4])  # it learns: only the sums were ever unmasked
    last = done.stdout.rstrip().splitlines()[-1]
    match = re.fullmatch(r"secure aggregation: max \|difference from plain FedAvg\| (\S+) \(bound (\S+)\), "
                         r"dropped (\d+) of (\d+)", last)
    assert match, last
    assert float(match[1]) <= float(match[2]) < 1e-5 and (match[3], match[4]) == ("1", "5")
