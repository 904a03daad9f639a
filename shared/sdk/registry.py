"""The model registry from Python: upload a version through a presigned URL, with a progress bar."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from .http import Client, FleettuneAPIError

CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _read(path: Path, offset: int, length: int, bar: tqdm) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        fh.seek(offset)
        left = length
        while left > 0 and (chunk := fh.read(min(CHUNK, left))):
            left -= len(chunk)
            bar.update(len(chunk))
            yield chunk


class ModelRegistry:
    """Versions of base models and adapters. `ModelRegistry(api_key=...).upload_version_from_path(...)`."""

    def __init__(self, api_key: str | None = None, base_url: str | None = None, client: Client | None = None) -> None:
        self.client = client or Client(api_key, base_url)

    def create_model(self, model_id: str, kind: str = "base", **fields) -> dict:
        return self.client.post("/api/v1/models", {"model_id": model_id, "kind": kind, **fields})

    def upload_version_from_path(self, model_id: str, file_path: str | os.PathLike, version: str,
                                 formats: list[str] | tuple[str, ...] = ("safetensors",), kind: str | None = None,
                                 progress: bool = True) -> dict:
        """Upload one file as an immutable version; the server checks its sha256 and size at the end.

        A model that is not registered yet is created, as `kind` ("base" unless given).
        """
        path = Path(file_path)
        size = path.stat().st_size
        sha256 = file_sha256(path)
        try:
            self.get(model_id)
        except FleettuneAPIError as err:
            if err.status != 404:
                raise
            self.create_model(model_id, kind or "base")
        plan = self.client.post(f"/api/v1/models/{model_id}/versions", {
            "version": version, "filename": path.name, "sha256": sha256, "size": size, "formats": list(formats)})
        parts = None
        with tqdm(total=size, unit="B", unit_scale=True, desc=f"{model_id} {version}", disable=not progress) as bar:
            if plan.get("parts"):
                parts = []
                for part in plan["parts"]:
                    response = self.client.upload(part, b"".join(_read(path, part["offset"], part["length"], bar)))
                    parts.append({"part_number": part["part_number"], "etag": response.headers["ETag"]})
            else:
                self.client.upload(plan["upload"], _read(path, 0, size, bar))
        return self.client.post(f"/api/v1/models/{model_id}/versions/{version}/complete", {"parts": parts})

    def models(self) -> list[dict]:
        return self.client.get("/api/v1/models")["models"]

    def get(self, model_id: str) -> dict:
        return self.client.get(f"/api/v1/models/{model_id}")

    def versions(self, model_id: str) -> list[dict]:
        return self.get(model_id)["versions"]

    def set_current(self, model_id: str, version: str) -> dict:
        return self.client.put(f"/api/v1/models/{model_id}/current", {"version": version})

    def download(self, model_id: str, version: str, dest: str | os.PathLike) -> Path:
        """Fetch a version to `dest` (a directory or a file path) and check its sha256."""
        signed = self.client.get(f"/api/v1/models/{model_id}/versions/{version}/download")
        dest = Path(dest)
        target = dest / signed["filename"] if dest.is_dir() else dest
        data = self.client.download(signed, max_bytes=signed["size"])
        if hashlib.sha256(data).hexdigest() != signed["sha256"]:
            raise ValueError(f"{model_id} {version}: downloaded bytes do not match the registry's sha256")
        target.write_bytes(data)
        return target
