"""Presigned URLs: how a device reads and writes exactly the objects it is handed, and nothing else.

S3 (MinIO, SeaweedFS, AWS): botocore signs the URL. A PUT URL signs `If-None-Match: *`, so the
object is written once, `x-amz-checksum-sha256`, so the store refuses any other bytes, and
`Content-Length`, so the store itself refuses a body of any other size; a device that drops or
changes any of them gets 403. (minio-py's presigner signs only `host`, which would let a device
overwrite its object; a URL without a signed length lets it store any size until retention.)

The local store (embedded mode) has no server of its own: the API serves its objects, and the URL
carries the same constraints in signed query parameters, checked with HMAC-SHA256.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import time
import urllib.parse
from typing import Protocol

from fleettune.shared.errors import Refusal

LOCAL_ROUTE = "/api/v1/objects/"


@dataclasses.dataclass(frozen=True)
class SignedRequest:
    """A URL to call, with the headers that must go with it."""

    url: str
    method: str
    headers: dict[str, str]
    expires_at: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def checksum_header(sha256_hex: str) -> str:
    """The `x-amz-checksum-sha256` value: base64 of the raw digest."""
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode()


class Presigner(Protocol):
    def get(self, key: str, expires_at: float, base_url: str) -> SignedRequest: ...

    def put(self, key: str, expires_at: float, base_url: str, sha256: str, size: int) -> SignedRequest: ...


def _seconds(expires_at: float, now: float) -> int:
    return max(1, min(7 * 24 * 3600, int(expires_at - now)))  # S3 caps presigned URLs at 7 days


class S3Presigner:
    """Signs for `public_url` (what devices reach); multipart calls go to `endpoint_url`."""

    def __init__(self, endpoint_url: str, access_key: str, secret_key: str, bucket: str, region: str = "us-east-1",
                 public_url: str | None = None, clock=time.time) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.clock = clock

        def client(url: str):
            return boto3.client(
                "s3", endpoint_url=url, aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                region_name=region, config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                                                  retries={"max_attempts": 2}))

        self.client = client(public_url or endpoint_url)
        self.api = self.client if not public_url or public_url == endpoint_url else client(endpoint_url)

    def start_multipart(self, key: str) -> str:
        return self.api.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]

    def put_part(self, key: str, upload_id: str, part_number: int, size: int, expires_at: float) -> SignedRequest:
        url = self.client.generate_presigned_url(
            "upload_part", Params={"Bucket": self.bucket, "Key": key, "UploadId": upload_id, "PartNumber": part_number,
                                   "ContentLength": size}, ExpiresIn=_seconds(expires_at, self.clock()))
        return SignedRequest(url, "PUT", {"Content-Length": str(size)}, expires_at)

    def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]]) -> None:
        self.api.complete_multipart_upload(
            Bucket=self.bucket, Key=key, UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etag} for n, etag in sorted(parts)]})

    def get(self, key: str, expires_at: float, base_url: str = "") -> SignedRequest:
        url = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=_seconds(expires_at, self.clock()))
        return SignedRequest(url, "GET", {}, expires_at)

    def put(self, key: str, expires_at: float, base_url: str, sha256: str, size: int) -> SignedRequest:
        checksum = checksum_header(sha256)
        params = {"Bucket": self.bucket, "Key": key, "IfNoneMatch": "*", "ChecksumSHA256": checksum,
                  "ContentLength": size}
        headers = {"If-None-Match": "*", "x-amz-checksum-sha256": checksum, "Content-Length": str(size)}
        url = self.client.generate_presigned_url("put_object", Params=params,
                                                 ExpiresIn=_seconds(expires_at, self.clock()))
        return SignedRequest(url, "PUT", headers, expires_at)


@dataclasses.dataclass(frozen=True)
class LocalGrant:
    """What a verified local URL allows."""

    method: str
    key: str
    once: bool
    sha256: str | None
    size: int | None  # a PUT's exact body size


class LocalPresigner:
    """URLs to the API's own object route for the local store, signed with a server-side key."""

    def __init__(self, signing_key: bytes, clock=time.time) -> None:
        self.signing_key = signing_key
        self.clock = clock

    def _sign(self, method: str, key: str, expires: int, once: bool, sha256: str, size: str) -> str:
        message = f"{method}\n{key}\n{expires}\n{int(once)}\n{sha256}\n{size}".encode()
        return hmac.new(self.signing_key, message, hashlib.sha256).hexdigest()

    def _url(self, base_url: str, method: str, key: str, expires_at: float, once: bool, sha256: str | None,
             size: int | None) -> str:
        expires, size_text = int(expires_at), "" if size is None else str(size)
        query = {"expires": expires, "once": int(once), "sha256": sha256 or "", "size": size_text,
                 "signature": self._sign(method, key, expires, once, sha256 or "", size_text)}
        return f"{base_url.rstrip('/')}{LOCAL_ROUTE}{urllib.parse.quote(key)}?{urllib.parse.urlencode(query)}"

    def get(self, key: str, expires_at: float, base_url: str) -> SignedRequest:
        return SignedRequest(self._url(base_url, "GET", key, expires_at, False, None, None), "GET", {}, expires_at)

    def put(self, key: str, expires_at: float, base_url: str, sha256: str, size: int) -> SignedRequest:
        headers = {"If-None-Match": "*", "x-amz-checksum-sha256": checksum_header(sha256), "Content-Length": str(size)}
        return SignedRequest(self._url(base_url, "PUT", key, expires_at, True, sha256, size), "PUT", headers,
                             expires_at)

    def verify(self, method: str, key: str, query: dict[str, str]) -> LocalGrant:
        """The grant a request's query carries; Refusal(403) when it is forged, altered or expired."""
        try:
            expires, once, sha256, size, signature = (int(query["expires"]), query["once"] == "1", query["sha256"],
                                                      query.get("size", ""), query["signature"])
        except (KeyError, ValueError):
            raise Refusal(403, "bad_signature", "the URL is not a presigned URL") from None
        expected = self._sign(method, key, expires, once, sha256, size)
        if not hmac.compare_digest(expected, signature):
            raise Refusal(403, "bad_signature", "the signature does not match this method and key")
        if self.clock() > expires:
            raise Refusal(403, "url_expired", "the presigned URL has expired")
        return LocalGrant(method, key, once, sha256 or None, int(size) if size else None)
