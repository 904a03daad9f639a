"""Exported versions from Python: list a version's artifacts, and fetch them with a progress bar.

A base is downloaded once per sha256 into a cache folder (a device keeps it between versions); an
adapter is a few kilobytes per version. Every file is checked against the sha256 it was served with.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tqdm import tqdm

from .http import Client, FleettuneAPIError, raise_for_problem

MAX_ARTIFACT_BYTES = 8 * 1024**3


def fetch(client: Client, signed: dict, sha256: str, size: int, dest: Path, progress: bool = True,
          label: str = "") -> Path:
    """GET a presigned URL to `dest`, streamed, checked against sha256 and size; cached when there."""
    dest = Path(dest)
    if dest.exists() and dest.stat().st_size == size and _sha256(dest) == sha256:
        return dest
    if size > MAX_ARTIFACT_BYTES:
        raise FleettuneAPIError(413, "object_too_large", f"{size} bytes > {MAX_ARTIFACT_BYTES}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    digest, got = hashlib.sha256(), 0
    with client.plain.stream("GET", signed["url"], headers=signed.get("headers") or {}) as response, \
            open(partial, "wb") as out, tqdm(total=size, unit="B", unit_scale=True, desc=label or dest.name,
                                             disable=not progress) as bar:
        if not response.is_success:
            response.read()
            raise_for_problem(response)
        for chunk in response.iter_bytes():
            got += len(chunk)
            if got > size:
                raise FleettuneAPIError(422, "digest_mismatch", f"more than the {size} bytes announced")
            digest.update(chunk)
            out.write(chunk)
            bar.update(len(chunk))
    if (got, digest.hexdigest()) != (size, sha256):
        partial.unlink(missing_ok=True)
        raise FleettuneAPIError(422, "digest_mismatch", f"{dest.name}: {got} bytes with sha256 "
                                f"{digest.hexdigest()[:12]}..., served as {size} and {sha256[:12]}...")
    partial.replace(dest)
    return dest


def fetch_served(client: Client, runtime: dict, cache_dir: Path, progress: bool = False) -> tuple[Path, Path]:
    """A device's `serve.runtime`: (the exported base, this version's adapter), both local files.
    The base comes from the cache when `runtime.base` is null (the device declared it holds it)."""
    cache_dir = Path(cache_dir)
    if runtime.get("status") != "ready":
        raise FleettuneAPIError(409, "export_pending", f"no version is exported to {runtime['format']} yet")
    base_path = cache_dir / "bases" / runtime["base_sha256"]
    if runtime.get("base") is not None:
        base = runtime["base"]
        fetch(client, base, base["sha256"], base["size"], base_path, progress, f"{runtime['format']} base")
    elif not base_path.exists():
        raise FileNotFoundError(f"the {runtime['format']} base {runtime['base_sha256'][:12]}... is not in {cache_dir}")
    adapter = runtime["adapter"]
    adapter_path = cache_dir / "adapters" / f"v{runtime['version']}-{adapter['sha256'][:16]}.safetensors"
    fetch(client, adapter, adapter["sha256"], adapter["size"], adapter_path, progress, f"v{runtime['version']} adapter")
    return base_path, adapter_path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
