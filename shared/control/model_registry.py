"""The model registry: base models and adapters, each versioned on its own, every version immutable.

Metadata lives in Redis (with AOF it survives restarts), artifacts in the object store under
models/{id}/{version}/{file}. A version is created pending with its declared sha256 and size, the
client uploads through a presigned URL (in parts past the multipart threshold), and `complete`
re-reads the object, checks both, and marks it ready. A ready version never changes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any, Literal

from fleettune.shared import keys
from fleettune.shared.control import model_files
from fleettune.shared.control.presign import Presigner, S3Presigner
from fleettune.shared.errors import ObjectNotFound, Refusal
from fleettune.shared.settings import Settings
from fleettune.shared.storage import ObjectStore

Kind = Literal["base", "adapter"]
MIN_PART = 5 * 1024 * 1024  # S3 refuses smaller parts (but the last)
MAX_PARTS = 10_000


class ModelRegistry:
    def __init__(self, client, store: ObjectStore, presigner: Presigner, settings: Settings,
                 clock: Callable[[], float] = time.time) -> None:
        self.r = client
        self.store = store
        self.presigner = presigner
        self.settings = settings
        self.clock = clock

    # --- models ----------------------------------------------------------------------------------

    def create_model(self, model_id: str, kind: Kind, base_model: str | None = None,
                     dims: dict | None = None, description: str = "") -> dict:
        fields = {"id": model_id, "kind": kind, "created_at": repr(self.clock()), "description": description[:500]}
        if base_model:
            fields["base_model"] = base_model
        if dims:
            fields["dims"] = json.dumps(dims)
        if not self.r.hsetnx(keys.model(model_id), "id", model_id):
            existing = self.model(model_id)
            if existing["kind"] != kind:
                raise Refusal(409, "model_exists", f"{model_id} exists as a {existing['kind']} model")
            return existing
        self.r.hset(keys.model(model_id), mapping=fields)
        self.r.sadd(keys.MODELS, model_id)
        return self.model(model_id)

    def record(self, model_id: str) -> dict | None:
        """The model's record; `facts` are its current version's (dimensions, trainable or why not)."""
        h = {k.decode(): v.decode() for k, v in self.r.hgetall(keys.model(model_id)).items()}
        if not h or "kind" not in h:
            return None
        if "dims" in h:
            h["dims"] = json.loads(h["dims"])
        if "current" in h:
            record = self.version(model_id, h["current"])
            h["formats"] = record.get("formats", [])  # runtimes' formats asked with it: federations export them
            facts = record.get("facts")
            if facts:
                h["facts"] = dict(facts, version=h["current"])
                h["dims"] = facts["dims"] or h.get("dims")
        return h

    def model(self, model_id: str) -> dict:
        h = self.record(model_id)
        if h is None:
            raise Refusal(404, "unknown_model", f"no model {model_id!r} in the registry")
        return {"id": model_id, "kind": h["kind"], "base_model": h.get("base_model"), "dims": h.get("dims"),
                "description": h.get("description", ""), "current_version": h.get("current"),
                "created_at": float(h["created_at"]), "versions": self.versions(model_id)}

    def models(self) -> list[dict]:
        return [self.model(m.decode()) for m in sorted(self.r.smembers(keys.MODELS))]

    def versions(self, model_id: str) -> list[dict]:
        raw = self.r.hgetall(keys.model_versions(model_id))
        return sorted((json.loads(v) for v in raw.values()), key=lambda v: v["created_at"])

    def version(self, model_id: str, version: str) -> dict:
        raw = self.r.hget(keys.model_versions(model_id), version)
        if raw is None:
            raise Refusal(404, "unknown_version", f"{model_id} has no version {version!r}")
        return json.loads(raw)

    # --- uploads ---------------------------------------------------------------------------------

    def start_upload(self, model_id: str, version: str, filename: str, sha256: str, size: int,
                     formats: list[str], base_url: str) -> dict[str, Any]:
        """Declare a version and get where to upload it; repeating a pending declaration resumes it."""
        self.model(model_id)
        if size > self.settings.max_model_bytes:
            raise Refusal(413, "model_too_large", f"{size} bytes is over the registry's limit of "
                          f"{self.settings.max_model_bytes} (FLEETTUNE_MAX_MODEL_BYTES)")
        key = keys.model_object(model_id, version, filename)
        multipart = isinstance(self.presigner, S3Presigner) and size > self.settings.multipart_threshold_bytes
        record = {"model_id": model_id, "version": version, "filename": filename, "sha256": sha256, "size": size,
                  "formats": formats, "key": key, "status": "pending", "created_at": self.clock()}
        if not self.r.hsetnx(keys.model_versions(model_id), version, json.dumps(record)):
            existing = self.version(model_id, version)
            same = (existing["sha256"], existing["size"], existing["filename"]) == (sha256, size, filename)
            if existing["status"] != "pending" or not same:
                raise Refusal(409, "version_exists", f"{model_id} version {version} exists and is immutable")
            record = existing
        expires_at = self.clock() + self.settings.url_ttl_s
        if not multipart:
            put = self.presigner.put(key, expires_at, base_url, sha256, size)
            return {"version": record, "upload": dict(put.as_dict(), key=key), "parts": None}
        part_size = max(MIN_PART, self.settings.multipart_threshold_bytes, math.ceil(size / MAX_PARTS))
        upload_id = record.get("upload_id") or self.presigner.start_multipart(key)
        if "upload_id" not in record:
            record["upload_id"] = upload_id
            self.r.hset(keys.model_versions(model_id), version, json.dumps(record))
        count = math.ceil(size / part_size)
        lengths = [min(part_size, size - (n - 1) * part_size) for n in range(1, count + 1)]
        parts = [dict(self.presigner.put_part(key, upload_id, n, length, expires_at).as_dict(), part_number=n,
                      offset=(n - 1) * part_size, length=length)
                 for n, length in enumerate(lengths, start=1)]
        return {"version": record, "upload": None, "parts": parts, "part_size": part_size}

    def complete_upload(self, model_id: str, version: str, parts: list[tuple[int, str]] | None) -> dict:
        """Check the uploaded bytes against the declaration and make the version ready (immutable).

        A base model's file is inspected in the same pass as its digest (model_files): its
        dimensions and whether devices can train on it go into the version; a malformed file is
        refused (422 invalid_model) and removed with its declaration. The first ready base version
        becomes the model's current one."""
        record = self.version(model_id, version)
        if record["status"] == "ready":
            return record
        if record.get("upload_id"):
            if not parts:
                raise Refusal(422, "parts_required", "a multipart upload completes with its parts' ETags")
            self.presigner.complete_multipart(record["key"], record["upload_id"], parts)  # type: ignore[attr-defined]
        kind = self.model(model_id)["kind"]
        facts, invalid = None, None
        try:
            with self.store.open(record["key"]) as raw:
                reader = model_files.HashingReader(raw)
                if kind == "base":
                    try:
                        facts = model_files.inspect(record["filename"], reader, record["size"])
                    except model_files.InvalidModel as exc:
                        invalid = str(exc)
                reader.drain()
        except ObjectNotFound:
            raise Refusal(409, "upload_missing", "nothing has been uploaded for this version") from None
        sha256, size = reader.sha256.hexdigest(), reader.size
        if (sha256, size) != (record["sha256"], record["size"]):
            raise Refusal(422, "digest_mismatch", f"uploaded {size} bytes with sha256 {sha256[:12]}..., "
                          f"declared {record['size']} and {record['sha256'][:12]}...")
        if invalid is not None:
            self._discard(model_id, version, record["key"])
            raise Refusal(422, "invalid_model", f"{record['filename']}: {invalid}")
        record = dict(record, status="ready", completed_at=self.clock())
        if facts is not None:
            record["facts"] = facts.as_dict()
        record.pop("upload_id", None)
        self.r.hset(keys.model_versions(model_id), version, json.dumps(record))
        if kind == "base":
            self.r.hsetnx(keys.model(model_id), "current", version)
        return record

    def _discard(self, model_id: str, version: str, key: str) -> None:
        """Remove a refused version, and its model too when nothing else was ever registered under it."""
        self.store.delete(key)
        self.r.hdel(keys.model_versions(model_id), version)
        if not self.r.hlen(keys.model_versions(model_id)) and not self.r.hexists(keys.model(model_id), "dims"):
            self.r.delete(keys.model(model_id))
            self.r.srem(keys.MODELS, model_id)

    def base_download(self, ref: str, base_url: str) -> dict | None:
        """The presigned download of a registered base `id@version` (None for a built-in base)."""
        model_id, at, version = ref.partition("@")
        if not at:
            return None
        record = self.version(model_id, version)
        get = self.presigner.get(record["key"], self.clock() + self.settings.url_ttl_s, base_url)
        return dict(get.as_dict(), sha256=record["sha256"], size=record["size"], filename=record["filename"],
                    format=(record.get("facts") or {}).get("format"))

    def set_current(self, model_id: str, version: str) -> dict:
        if self.version(model_id, version)["status"] != "ready":
            raise Refusal(409, "version_not_ready", f"{model_id} version {version} has not been completed")
        self.r.hset(keys.model(model_id), "current", version)
        return self.model(model_id)

    def download(self, model_id: str, version: str, base_url: str) -> dict:
        record = self.version(model_id, version)
        if record["status"] != "ready":
            raise Refusal(409, "version_not_ready", f"{model_id} version {version} has not been completed")
        get = self.presigner.get(record["key"], self.clock() + self.settings.url_ttl_s, base_url)
        return dict(get.as_dict(), sha256=record["sha256"], size=record["size"], filename=record["filename"])
