"""Object storage behind one small interface: S3 (MinIO, SeaweedFS, AWS) or a local directory."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

import urllib3

from fleettune.shared.errors import ObjectNotFound, RejectReason, Rejected, StorageUnavailable


class ObjectStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        """Whole object; Rejected(OBJECT_TOO_LARGE) past max_bytes, ObjectNotFound if absent."""
        ...

    def exists(self, key: str) -> bool: ...

    def digest(self, key: str) -> tuple[str, int]:
        """(sha256 hex, size) of an object, read as a stream; ObjectNotFound if absent."""
        ...

    def open(self, key: str) -> contextlib.AbstractContextManager[BinaryIO]:
        """The object as a stream to `read(n)` from; ObjectNotFound if absent."""
        ...

    def delete(self, key: str) -> None:
        """Delete one object (absent is fine)."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with `prefix` (a folder, ending in /); the count."""
        ...


def _digest(fh: BinaryIO) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    while chunk := fh.read(1 << 20):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def _too_large(key: str, size: int, max_bytes: int) -> Rejected:
    return Rejected(RejectReason.OBJECT_TOO_LARGE, f"{key}: {size} bytes > {max_bytes}")


class LocalObjectStore:
    """A directory tree standing in for a bucket (the embedded default, like SQLite for Postgres)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"key escapes the store: {key!r}")
        return path

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # write-then-rename: a reader never sees half an object
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        try:
            with open(self._path(key), "rb") as fh:
                data = fh.read() if max_bytes is None else fh.read(max_bytes + 1)
        except FileNotFoundError:
            raise ObjectNotFound(key) from None
        if max_bytes is not None and len(data) > max_bytes:
            raise _too_large(key, len(data), max_bytes)
        return data

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def path(self, key: str) -> Path:
        """The file behind an object (the API streams it); ObjectNotFound if absent."""
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        return path

    def digest(self, key: str) -> tuple[str, int]:
        with self.open(key) as fh:
            return _digest(fh)

    @contextlib.contextmanager
    def open(self, key: str) -> Iterator[BinaryIO]:
        try:
            fh = open(self._path(key), "rb")
        except FileNotFoundError:
            raise ObjectNotFound(key) from None
        with fh:
            yield fh

    def create(self, key: str, chunks: Iterable[bytes]) -> bool:
        """Write a new object; False, with nothing changed, when the key exists (write-once)."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            return False
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
            os.link(tmp, path)  # atomic, and fails if another writer got there first
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def delete_prefix(self, prefix: str) -> int:
        folder = self._path(prefix.rstrip("/"))
        if not folder.is_dir():
            return 0
        files = [p for p in folder.rglob("*") if p.is_file()]
        for path in files:
            path.unlink()
        return len(files)


class S3ObjectStore:
    """S3 through the minio SDK; connection failures become StorageUnavailable (retried)."""

    def __init__(self, client, bucket: str) -> None:  # client: minio.Minio
        self.client = client
        self.bucket = bucket
        self._bucket_ready = False

    @classmethod
    def connect(cls, endpoint: str, access_key: str, secret_key: str, bucket: str, secure: bool = False) -> S3ObjectStore:
        import minio

        # Short timeouts and no SDK retry loop: Celery's retry with backoff owns retrying.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5, read=60), retries=urllib3.Retry(total=0), maxsize=8
        )
        client = minio.Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure, http_client=http)
        return cls(client, bucket)

    def ensure_bucket(self) -> None:
        with self._errors(self.bucket):
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket)
        self._bucket_ready = True

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        if not self._bucket_ready:  # the store was down when this process started
            self.ensure_bucket()
        with self._errors(key):
            self.client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type)

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        with self._errors(key):
            response = self.client.get_object(self.bucket, key)
            try:
                # One request: the size check reads Content-Length, and urllib3 stops at that
                # length, so an oversized object is refused without reading its body.
                size = int(response.headers.get("Content-Length", -1))
                if max_bytes is not None and size > max_bytes:
                    raise _too_large(key, size, max_bytes)
                data = response.read() if max_bytes is None or size >= 0 else response.read(max_bytes + 1)
            finally:
                response.close()
                response.release_conn()
        if max_bytes is not None and len(data) > max_bytes:
            raise _too_large(key, len(data), max_bytes)
        return data

    def exists(self, key: str) -> bool:
        try:
            with self._errors(key):
                self.client.stat_object(self.bucket, key)
            return True
        except ObjectNotFound:
            return False

    def delete(self, key: str) -> None:
        with self._errors(key):
            self.client.remove_object(self.bucket, key)  # S3 answers 204 for an absent key too

    def delete_prefix(self, prefix: str) -> int:
        from minio.deleteobjects import DeleteObject

        with self._errors(prefix):
            names = [o.object_name for o in self.client.list_objects(self.bucket, prefix=prefix, recursive=True)]
            errors = list(self.client.remove_objects(self.bucket, (DeleteObject(n) for n in names)))
        if errors:
            raise StorageUnavailable(f"{prefix}: {len(errors)} objects not deleted: {errors[0]}")
        return len(names)

    def digest(self, key: str) -> tuple[str, int]:
        with self.open(key) as fh:
            return _digest(fh)

    @contextlib.contextmanager
    def open(self, key: str) -> Iterator[BinaryIO]:
        with self._errors(key):
            response = self.client.get_object(self.bucket, key)
            try:
                yield response  # urllib3's response: read(n) streams the body
            finally:
                response.close()
                response.release_conn()

    @contextlib.contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        """Map minio/urllib3 failures onto our tree: missing keys are permanent, the rest transient."""
        from minio.error import S3Error

        try:
            yield
        except (Rejected, ObjectNotFound):
            raise
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                raise ObjectNotFound(key) from None
            if exc.code in ("AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId"):
                raise  # a misconfiguration: retrying cannot help
            raise StorageUnavailable(f"{key}: {exc.code}") from exc
        except (OSError, urllib3.exceptions.HTTPError) as exc:
            raise StorageUnavailable(f"{key}: {type(exc).__name__}: {exc}") from exc


def open_store(settings) -> ObjectStore:
    """The store the settings name: S3 when an endpoint is set, else a local directory."""
    if settings.s3_endpoint:
        store = S3ObjectStore.connect(
            settings.s3_endpoint, settings.s3_access_key, settings.s3_secret_key,
            settings.s3_bucket, settings.s3_secure,
        )
        # a process must start (and record what it can in Redis) while the store is down: the
        # bucket is then made on the first write instead
        with contextlib.suppress(StorageUnavailable):
            store.ensure_bucket()
        return store
    return LocalObjectStore(Path(settings.data_dir) / "objects")
