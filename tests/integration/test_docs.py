"""The docs as a user meets them: the site builds with --strict, and every Python snippet in the
README and docs runs, verbatim but for the API key and the host, against a real API."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from fleettune.shared.control.auth import Tokens
from fleettune.shared.device.models import TINY
from fleettune.shared.runtime import Runtime
from fleettune.shared.settings import Settings
from fleettune.workers.local import services

pytestmark = pytest.mark.services
ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = "<!-- snippet:"
HOST = "https://fleettune.example.com"


def _snippets() -> list[tuple[str, str]]:
    """(where, code) of every ```python block; each must say it is a snippet that runs."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in re.finditer(r"```python\n(.*?)```", text, re.S):
            before = text[:match.start()].rstrip().splitlines()[-1]
            where = f"{page.relative_to(ROOT)}:{text[:match.start()].count(chr(10)) + 1}"
            assert before.startswith(MARKER), f"{where}: a Python block users would copy must run (mark it {MARKER})"
            found.append((where, match.group(1)))
    return found


def test_the_docs_site_builds_strictly(tmp_path):
    done = subprocess.run([str(Path(sys.executable).parent / "mkdocs"), "build", "--strict", "-d", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "threat-model" / "index.html").exists()


@pytest.fixture(scope="module")
def docs_api(redis_url, s3_endpoint, workdir):
    """An API of its own (Redis database 11, its own bucket): the snippets' names are the docs' own."""
    env = services.service_env(redis_url.rsplit("/", 1)[0] + "/11", s3_endpoint, bucket="fleettune-docs")
    api = services.Api(env, workdir)
    worker = services.Worker("docs", env, workdir, concurrency=1)  # as operating.md deploys: a session's
    # start (v0, round 1) and every close are a worker's
    key = Tokens(Runtime.from_settings(Settings.from_env(env)).redis).create_api_key("admin", "docs")[1]
    yield api.url, key
    worker.stop()
    api.stop()


@pytest.mark.parametrize("where,code", _snippets(), ids=[w for w, _ in _snippets()])
def test_every_python_snippet_runs(where, code, docs_api, tmp_path):
    url, key = docs_api
    with tarfile.open(tmp_path / "domain-llm-v1.tar.gz", "w:gz") as tar:  # the file the README registers
        for file in sorted(TINY.iterdir()):
            tar.add(file, arcname=f"domain-llm-v1/{file.name}")
    script = re.sub(r"\bKEY\b", repr(key), code).replace(HOST, url)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, f"{where}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
