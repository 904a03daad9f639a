"""The compose file's Redis ACL users on a real redis-server: the services work, everyone else is out.

The `--user` lines are read from deploy/compose.yaml itself, so what ships is what is tested.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import redis
import yaml

from fleettune import DeviceClient, Federation
from fleettune.shared.control.auth import Tokens
from fleettune.shared.protocol.updates import encode_update
from fleettune.workers.local import services
from tests.reference import random_deltas

pytestmark = pytest.mark.services
COMPOSE = Path(__file__).resolve().parents[2] / "deploy" / "compose.yaml"
PASSWORDS = {"REDIS_WORKER_PASSWORD": "worker-secret", "REDIS_API_PASSWORD": "api-secret",
             "REDIS_REPLICA_PASSWORD": "replica-secret", "REDIS_SENTINEL_PASSWORD": "sentinel-secret"}


def _acl_args() -> list[str]:
    command = yaml.safe_load(COMPOSE.read_text())["services"]["redis"]["command"]
    args, in_user = [], False
    for word in command[1:]:
        in_user = word == "--user" or (in_user and not word.startswith("--"))
        if in_user:
            args.append(re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: PASSWORDS[m.group(1)], word))
    return args


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("acl")
    port = services.free_port()
    proc = subprocess.Popen([shutil.which("redis-server"), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--dir", str(workdir), *_acl_args()],
                            stdout=(workdir / "redis.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    admin = redis.Redis(port=port, username="fleettune-worker", password=PASSWORDS["REDIS_WORKER_PASSWORD"])
    end = time.monotonic() + 15
    while True:
        try:
            admin.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < end
            time.sleep(0.1)
    yield port, workdir
    services._stop(proc)


def test_without_a_password_nothing_gets_in_and_no_user_may_administer(acl_redis):
    port, _ = acl_redis
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port).get("ft:federations")
    for user, password in (("fleettune-worker", "worker-secret"), ("fleettune-api", "api-secret")):
        client = redis.Redis(port=port, username=user, password=password)
        for command in (("FLUSHALL",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("ACL", "LIST")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.execute_command(*command)
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.set("not-fleettunes", 1)


def test_workers_and_the_api_run_a_round_with_their_own_users(acl_redis, s3_endpoint):
    port, workdir = acl_redis
    url = lambda user, password: f"redis://{user}:{password}@127.0.0.1:{port}/0"  # noqa: E731
    worker_env = services.service_env(url("fleettune-worker", "worker-secret"), s3_endpoint, bucket="fleettune-acl")
    api_env = dict(worker_env, FLEETTUNE_REDIS_URL=url("fleettune-api", "api-secret"))
    worker = services.Worker("acl", worker_env, workdir, beat=True, via_cli=True)
    api = services.Api(api_env, workdir)
    try:
        admin = Tokens(redis.Redis.from_url(worker_env["FLEETTUNE_REDIS_URL"])).create_api_key("admin", "acl")[1]
        federation = Federation(admin, "acl-fed", api.url)
        federation.create(model="tiny-llama")
        tokens = {d: federation.register_device(d) for d in ("a", "b")}
        federation.train(model="tiny-llama", rounds=1, min_updates=2)
        spec = None
        for device, token in tokens.items():
            client = DeviceClient(token, "acl-fed", api.url)
            plan = client.check_in()
            spec = spec or {k: tuple(v.shape) for k, v in _load(client.download(plan)).items()}
            client.send(plan, encode_update(random_deltas(spec, np.random.default_rng(0), 0.01)), num_samples=5)
        end = time.monotonic() + 60
        while federation.round(1)["status"] != "closed":
            assert time.monotonic() < end, federation.round(1)
            time.sleep(0.1)
        assert federation.round(1)["contributors"] == ["a", "b"] and worker.alive()
    finally:
        api.stop()
        worker.stop()


def _load(blob: bytes):
    from safetensors.numpy import load

    return load(blob)


def _compose_args() -> list[str]:
    """The redis service's whole command (replication, min-replicas, users), passwords filled in."""
    command = yaml.safe_load(COMPOSE.read_text())["services"]["redis"]["command"]
    return [re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: PASSWORDS[m.group(1)], word) for word in command]


def _sentinel_conf(primary_port: int, port: int) -> str:
    """The config the compose sentinel's shell writes, run by sh here, pointed at local ports."""
    script = yaml.safe_load(COMPOSE.read_text())["services"]["sentinel-1"]["command"][0]
    script = script.replace("$$", "$").split(" > /tmp/sentinel.conf")[0]
    conf = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True,
                          env={"REDIS_SENTINEL_PASSWORD": PASSWORDS["REDIS_SENTINEL_PASSWORD"], "PATH": "/usr/bin:/bin"}).stdout
    return conf.replace("port 26379", f"port {port}\nbind 127.0.0.1").replace(
        "fleettune redis 6379", f"fleettune 127.0.0.1 {primary_port}")


def test_the_compose_redis_replicates_answers_the_apis_wait_and_fails_over_with_its_own_users(tmp_path):
    """The compose topology's users at work: a replica syncs as `replica`, the API user may count
    replicas (INFO) and WAIT, and a sentinel authenticated as `sentinel` promotes the replica."""
    ports = [services.free_port() for _ in range(3)]
    procs = []
    try:
        for n, port in enumerate(ports[:2]):
            role = ["--replicaof", "127.0.0.1", str(ports[0])] if n else []
            procs.append(subprocess.Popen([shutil.which("redis-server"), "--bind", "127.0.0.1", "--port", str(port),
                                           "--dir", str(tmp_path), "--appendfilename", f"a{port}.aof",
                                           "--appenddirname", f"aof{port}", *_compose_args(), *role],
                                          stdout=(tmp_path / f"redis-{port}.log").open("w"), stderr=subprocess.STDOUT,
                                          start_new_session=True))
        api = redis.Redis(port=ports[0], username="fleettune-api", password=PASSWORDS["REDIS_API_PASSWORD"])
        # min-replicas-to-write 1: the primary takes writes once its replica is in sync
        services._wait(lambda: api.set("ft:probe", "1"), "a replica in sync", 20)
        assert api.execute_command("WAIT", 1, 1000) == 1  # what a submit runs before its 202
        with pytest.raises(redis.exceptions.NoPermissionError):
            api.execute_command("CONFIG", "GET", "*")

        (tmp_path / "sentinel.conf").write_text(_sentinel_conf(ports[0], ports[2]))
        procs.append(subprocess.Popen([shutil.which("redis-sentinel"), str(tmp_path / "sentinel.conf")],
                                      stdout=(tmp_path / "sentinel.log").open("w"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
        sentinel = redis.Redis(port=ports[2])
        services._wait(lambda: len(sentinel.sentinel_slaves("fleettune")) == 1, "the sentinel", 20)
        # a failover needs the sentinel user's rights (REPLICAOF, CONFIG REWRITE, ...); the sentinel
        # says NOGOODSLAVE until it has read the replica's INFO
        services._wait(lambda: sentinel.execute_command("SENTINEL", "FAILOVER", "fleettune"), "a failover", 30)
        services._wait(lambda: int(sentinel.sentinel_get_master_addr_by_name("fleettune")[1]) == ports[1],
                       "the promotion", 30)
        promoted = redis.Redis(port=ports[1], username="fleettune-api", password=PASSWORDS["REDIS_API_PASSWORD"])
        services._wait(lambda: promoted.info("replication")["role"] == "master", "a primary", 20)
        assert promoted.get("ft:probe") == b"1"
    finally:
        for proc in procs:
            services._stop(proc)
