"""The HTTP client under the SDK: bearer auth, problem+json errors, and presigned transfers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


class FleettuneAPIError(Exception):
    """The API refused a request: `status`, the problem's stable `code`, and its `detail`."""

    def __init__(self, status: int, code: str, detail: str, body: dict | None = None) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.body = body or {}


def raise_for_problem(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    raise FleettuneAPIError(response.status_code, body.get("code", "http_error"),
                            body.get("detail", response.text[:200]), body)


class Client:
    """One API connection. `api_key` is an operator key or a device token; FLEETTUNE_URL sets the URL."""

    def __init__(self, api_key: str | None = None, base_url: str | None = None, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None,
                 plain_transport: httpx.BaseTransport | None = None) -> None:
        """`transport` / `plain_transport` (for presigned URLs): connection pools to share, as a
        load generator driving many devices does; closing this client closes them."""
        self.base_url = (base_url or os.environ.get("FLEETTUNE_URL") or DEFAULT_URL).rstrip("/")
        token = api_key or os.environ.get("FLEETTUNE_API_KEY")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # connect retries only: a request that reached the server is never sent twice behind the caller's back
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout,
                                 transport=transport or httpx.HTTPTransport(retries=3))
        # presigned URLs carry their own authority: never send the bearer token to the object store
        self.plain = httpx.Client(timeout=timeout, transport=plain_transport or httpx.HTTPTransport(retries=3))

    def request(self, method: str, path: str, **kwargs) -> Any:
        response = self.http.request(method, path, **kwargs)
        raise_for_problem(response)
        return response.json() if response.content else None

    def get(self, path: str, **kwargs) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, json: Any = None) -> Any:
        return self.request("POST", path, json=json)

    def put(self, path: str, json: Any = None) -> Any:
        return self.request("PUT", path, json=json)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def download(self, signed: dict, max_bytes: int | None = None) -> bytes:
        """GET a presigned URL; refuses more than max_bytes without reading it all."""
        with self.plain.stream("GET", signed["url"], headers=signed.get("headers") or {}) as response:
            if not response.is_success:
                response.read()
                raise_for_problem(response)
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise FleettuneAPIError(413, "object_too_large", f"more than {max_bytes} bytes")
                chunks.append(chunk)
        return b"".join(chunks)

    def upload(self, signed: dict, body: bytes | Iterator[bytes]) -> httpx.Response:
        """PUT to a presigned URL with the headers it was signed with."""
        response = self.plain.request(signed.get("method", "PUT"), signed["url"], headers=signed.get("headers") or {},
                                      content=body)
        if not response.is_success:
            code = {412: "already_uploaded", 403: "upload_forbidden", 400: "bad_digest"}.get(response.status_code,
                                                                                            "upload_failed")
            raise FleettuneAPIError(response.status_code, code, response.text[:300])
        return response

    def close(self) -> None:
        self.http.close()
        self.plain.close()
