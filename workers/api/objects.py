"""The local object store's presigned URLs, served by the API (embedded mode has no S3 server).

It enforces what S3 enforces for the same URL: the signature, expiry, write-once, the exact size
(the signed Content-Length) and the sha256.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, Response

from fleettune.shared.errors import ObjectNotFound, Refusal
from fleettune.workers.api.deps import services
from fleettune.workers.api.services import Services

router = APIRouter(tags=["local object store"], include_in_schema=False)
# bytes, not JSON: what a GET answers is said by its content type (documented here for when the router is shown)
BYTES = {200: {"description": "the object's bytes",
               "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


def _grant(svc: Services, method: str, key: str, request: Request):
    if svc.local is None:
        raise Refusal(404, "not_found", "objects are served by the S3 store, not the API")
    return svc.local.verify(method, key, dict(request.query_params))


@router.get("/api/v1/objects/{key:path}", response_class=FileResponse, responses=BYTES)
def get_object(key: str, request: Request, svc: Services = Depends(services)):
    _grant(svc, "GET", key, request)
    try:
        path = svc.runtime.store.path(key)
    except ObjectNotFound:
        raise Refusal(404, "no_such_key", key) from None
    return FileResponse(path, media_type="application/octet-stream")


@router.put("/api/v1/objects/{key:path}", response_class=Response,
            responses={200: {"description": "stored; no body, the ETag is the object's sha256"}})
async def put_object(key: str, request: Request, svc: Services = Depends(services)):
    grant = _grant(svc, "PUT", key, request)
    store = svc.runtime.store
    if grant.once and store.exists(key):
        raise Refusal(412, "precondition_failed", "the object exists and this URL writes it once")
    limit = grant.size if grant.size is not None else svc.runtime.settings.max_update_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared != str(limit) and grant.size is not None:
        raise Refusal(403, "bad_signature", f"this URL is signed for a body of exactly {grant.size} bytes")
    digest, size = hashlib.sha256(), 0
    with tempfile.TemporaryFile() as spool:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Refusal(413, "object_too_large", f"more than {limit} bytes")
            digest.update(chunk)
            spool.write(chunk)
        if grant.size is not None and size != grant.size:
            raise Refusal(403, "bad_signature", f"this URL is signed for a body of exactly {grant.size} bytes")
        if grant.sha256 is not None and digest.hexdigest() != grant.sha256:
            raise Refusal(400, "bad_digest", "the body does not match the sha256 this URL is bound to")
        spool.seek(0)
        if not store.create(key, _chunks(spool)):
            raise Refusal(412, "precondition_failed", "the object exists and this URL writes it once")
    return Response(status_code=200, headers={"ETag": f'"{digest.hexdigest()}"'})


def _chunks(fh) -> Iterator[bytes]:
    while chunk := fh.read(1 << 20):
        yield chunk
