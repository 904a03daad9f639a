"""The wheel a user gets from `pip install .` (and the container image): built from a clean copy,
installed non-editable into a fresh venv, and run from outside the checkout.

The fresh venv reads the project's dependencies from the test venv's site-packages through a path
entry (nothing of fleettune itself: an editable install's finder is started by a .pth file, and a
path entry's own .pth files are not run), so what it imports of fleettune comes from the wheel alone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fleettune import DeviceClient, Federation
from fleettune.shared.protocol.adapter_spec import LAYOUTS, AdapterConfig, build_spec
from fleettune.shared.protocol.updates import encode_update
from fleettune.workers.local import services
from tests.reference import random_deltas

pytestmark = pytest.mark.services
ROOT = Path(__file__).resolve().parents[2]


def _clean_copy(dest: Path) -> Path:
    """The files git would commit (tracked, or new and not ignored): no build output, no venv."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (not editable); returns its bin/."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = _clean_copy(tmp / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                    "-w", str(tmp / "dist")], check=True, capture_output=True)
    wheel = next((tmp / "dist").glob("fleettune-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"fleettune"}, tops  # site-packages gains one name
    for package in ("strategies", "split", "control", "state", "device"):  # found, never listed by hand
        assert f"fleettune/shared/{package}/__init__.py" in names
    assert "fleettune/shared/device/assets/tiny-llama/model.safetensors" in names
    assert not any(n.startswith("fleettune/shared/sdk/") for n in names)  # the SDK is `fleettune` itself

    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    dependencies = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    (site / "project-dependencies.pth").write_text("\n".join(dependencies) + "\n")
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True)
    return venv / "bin"


def _run(bin_dir: Path, cwd: Path, *args: str, timeout: float = 300, env: dict | None = None) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FLEETTUNE_", "PYTHONPATH"))}
    done = subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=dict(clean, OMP_NUM_THREADS="1", **(env or {})))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_the_wheel_imports_one_sdk_object_and_no_generic_top_level_names(installed, tmp_path):
    out = _run(installed, tmp_path, "python", "-c", (
        "import importlib.util, fleettune, fleettune.http, fleettune.shared.device.client as c\n"
        "assert fleettune.FleettuneAPIError is fleettune.http.FleettuneAPIError is c.FleettuneAPIError\n"
        "assert importlib.util.find_spec('shared') is None and importlib.util.find_spec('workers') is None\n"
        "import fleettune.shared.pipeline.rounds, fleettune.shared.strategies, fleettune.shared.split, fleettune.workers.worker.tasks\n"
        "print(fleettune.__file__)"))
    assert str(installed.parent) in out and str(ROOT) not in out


def test_the_installed_demo_runs_from_outside_the_checkout(installed, tmp_path):
    out = _run(installed, tmp_path, "fleettune", "demo", "--rounds", "1", "--devices", "3", timeout=600)
    assert "closed" in out and (tmp_path / "fleettune-demo" / "perplexity.png").exists()


def test_an_installed_worker_and_api_publish_a_version(installed, redis_url, s3_endpoint, workdir, tmp_path):
    # a Redis database and a bucket of its own: only the installed processes serve this federation
    env = services.service_env(redis_url.rsplit("/", 1)[0] + "/7", s3_endpoint, bucket="fleettune-wheel")
    worker = services.Worker("wheel", env, workdir, concurrency=1, beat=True, via_cli=True, bin_dir=installed,
                             cwd=tmp_path)
    api = services.Api(env, workdir, bin_dir=installed, cwd=tmp_path)
    try:
        printed = _run(installed, tmp_path, "fleettune", "bootstrap", "api-key", "create", "--scope", "admin", "--name", "wheel",
                       env=env)
        key = next(word for word in printed.split() if word.startswith("ftk_"))
        federation = Federation(key, "wheel", api.url)
        federation.create(model="tiny-llama")
        devices = [DeviceClient(federation.register_device(f"d{i}", ram_mb=8192, storage_mb=4096), "wheel", api.url)
                   for i in range(2)]
        federation.train(model="tiny-llama", rounds=1, min_updates=2)
        spec = build_spec(LAYOUTS["tiny-llama"], AdapterConfig()).tensors
        rng = np.random.default_rng(0)
        for device in devices:
            plan = device.check_in(ram_mb=8192, storage_mb=4096)
            device.send(plan, encode_update(random_deltas(spec, rng, 0.01)), num_samples=10)
        end = time.monotonic() + 120
        while federation.round(1)["status"] not in ("closed", "failed"):
            assert time.monotonic() < end, "round 1 did not settle"
            time.sleep(0.2)
        assert federation.round(1)["status"] == "closed"
        assert [v["version"] for v in federation.versions()][-1] == 1
    finally:
        api.stop()
        worker.stop()
