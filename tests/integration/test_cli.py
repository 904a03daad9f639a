"""The commands users type, run as subprocesses against the real services."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleettune.shared.protocol import versions

pytestmark = pytest.mark.services
FLEETTUNE = str(Path(sys.executable).parent / "fleettune")


def _run(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([FLEETTUNE, *args], env=dict(os.environ, OMP_NUM_THREADS="1", **env),
                          capture_output=True, text=True, timeout=timeout)


def test_simulate_drives_rounds_through_the_gateway_and_the_workers(env, pipeline):
    client_env = {"FLEETTUNE_URL": pipeline.api_url, "FLEETTUNE_API_KEY": pipeline.admin_key}  # no Redis, no S3
    done = _run(client_env, "simulate", "--federation", "sim-cli", "--devices", "6", "--rounds", "2",
                "--min-updates", "3", "--max-rounds", "2", "--rank", "4")
    assert done.returncode == 0, done.stderr[-2000:]
    state = pipeline.runtime.state
    status = state.federations.status("sim-cli")
    assert (status["status"], status["round"], status["version"]) == ("completed", "2", "2")
    assert f"session {status['session']}: completed" in done.stdout
    assert state.federations.stats("sim-cli") == {"received": 12, "accepted": 12}
    manifest = versions.manifest(pipeline.runtime.store, "sim-cli", 2)
    assert len(manifest["contributors"]) == 6 and manifest["num_parameters"] == 4 * 4 * 4 * (128 + 128)

    status = _run(env, "bootstrap", "federation", "status", "sim-cli")
    assert status.returncode == 0
    assert json.loads(status.stdout)["round"]["status"] == "closed"
    dead = _run(env, "bootstrap", "deadletters", "-n", "5")  # of every federation: earlier tests' too
    assert dead.returncode == 0, dead.stderr[-2000:]
    assert all({"device", "reason"} <= json.loads(line).keys() for line in dead.stdout.splitlines())
    assert not any(json.loads(line).get("federation") == "sim-cli" for line in dead.stdout.splitlines())


def test_federation_create_then_a_duplicate_name_is_a_clear_error(env, pipeline):
    first = _run(env, "bootstrap", "federation", "create", "cli-fed", "--devices", "3", "--kind", "prompt_tuning")
    assert first.returncode == 0, first.stderr[-2000:]
    assert json.loads(first.stdout) == {"federation": "cli-fed", "round": 1, "cohort": 3, "parameters": 16 * 128,
                                          "refused": []}
    again = _run(env, "federation", "create", "cli-fed")  # the command's first name still answers
    assert again.returncode == 2 and "already exists" in again.stderr


def test_a_worker_without_redis_configured_refuses_to_start():
    done = _run({}, "worker", timeout=60)
    assert done.returncode != 0 and "FLEETTUNE_REDIS_URL" in done.stderr


def test_a_worker_that_dies_of_an_unrecoverable_error_exits_non_zero_for_its_supervisor(tmp_path):
    # a Redis user that may not read the worker's control queue: Celery's consumer fails for good
    import shutil

    from fleettune.workers.local import services

    port = services.free_port()
    redis_proc = subprocess.Popen(
        [shutil.which("redis-server"), "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--dir", str(tmp_path),
         "--user", "default", "off", "--user", "w", "on", ">pw", "~ft:*", "~fleettune.*", "~_kombu.*", "~unacked*",
         "&*", "+@all", "-@admin", "-@dangerous"], stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(0.5)
        done = _run({"FLEETTUNE_REDIS_URL": f"redis://w:pw@127.0.0.1:{port}/0"}, "worker", "-c", "1",
                    "--without-mingle", "--without-gossip", timeout=90)
        assert "Unrecoverable error" in done.stderr + done.stdout
        assert done.returncode != 0  # so compose's restart: on-failure and Kubernetes start it again
    finally:
        services._stop(redis_proc)


def test_the_api_commands_print_tables_and_upload_with_a_progress_bar(pipeline, tmp_path):
    client_env = {"FLEETTUNE_URL": pipeline.api_url, "FLEETTUNE_API_KEY": pipeline.admin_key}
    assert _run(client_env, "federations", "create", "cli-api", "--adapter", '{"type": "lora", "rank": 4}').returncode == 0
    token = _run(client_env, "devices", "register", "cli-api", "phone-1", "--ram-mb", "4096")
    assert token.returncode == 0 and token.stdout.startswith("ftd_")
    chosen = _run(client_env, "federations", "strategy", "cli-api", "--algorithm", "fedadam",
                  "--aggregation", '{"beta2": 0.999}')
    assert chosen.returncode == 0, chosen.stderr[-2000:]
    assert " fedadam " in chosen.stdout and " adam " in chosen.stdout and " 0.01" in chosen.stdout
    refused = _run(client_env, "federations", "strategy", "cli-api", "--aggregation", '{"lora": "exact"}')
    assert refused.returncode == 2 and "422 invalid_config" in refused.stderr  # exact takes sgd only
    assert pipeline.runtime.state.federations.config("cli-api").aggregation.beta2 == 0.999
    session = _run(client_env, "sessions", "create", "--federation", "cli-api", "--rounds", "3",
                   "--algorithm", "fedadam")
    assert session.returncode == 0 and " active " in session.stdout
    listed = _run(client_env, "federations", "list")
    row = next(line.split() for line in listed.stdout.splitlines() if line.startswith("cli-api "))
    assert row[:4] == ["cli-api", "active", "1", "0"]
    devices = _run(client_env, "devices", "list", "cli-api").stdout
    assert "phone-1" in devices and "4096" in devices
    split = _run(client_env, "split", "set", "cli-api", "--bottleneck", "16", "--sigma", "0.6", "--clip", "130",
                 "--sample-rate", "0.014", "--max-epsilon", "8")
    assert split.returncode == 0 and " 16 " in split.stdout and " 0.014 " in split.stdout, split.stderr[-2000:]
    too_wide = _run(client_env, "split", "set", "cli-api", "--bottleneck", "129")  # the tiny model is 128 wide
    assert too_wide.returncode == 2 and "422 invalid_config" in too_wide.stderr
    no_accountant = _run(client_env, "split", "set", "cli-api", "--sigma", "0.6", "--max-epsilon", "8")
    assert no_accountant.returncode == 2 and "sample_rate" in no_accountant.stderr
    artifact = tmp_path / "adapter.safetensors"
    artifact.write_bytes(b"\0" * 100_000)
    upload = _run(client_env, "models", "upload", "cli-model", str(artifact), "--version", "1", "--kind", "adapter")
    assert upload.returncode == 0 and " ready " in upload.stdout and "100k/100k" in upload.stderr.replace(" ", "")
    assert "cli-model" in _run(client_env, "models", "list").stdout
    read_key = _run(client_env, "keys", "create", "--scope", "read").stdout.strip()
    denied = _run({"FLEETTUNE_URL": pipeline.api_url, "FLEETTUNE_API_KEY": read_key}, "keys", "list")
    assert denied.returncode == 2 and "403 forbidden" in denied.stderr
