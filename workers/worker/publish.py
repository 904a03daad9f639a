"""The gateway's enqueue on a Redis broker: the Celery message, written in the ledger's transaction.

Celery's `send_task` costs a submit about 0.4 ms of CPU and a round trip of its own: kombu builds
a new Redis client object per message and walks its producer machinery. On a Redis broker a
published task is one LPUSH of a JSON document onto the queue's list, so the gateway builds the
same document with Celery's own `as_task_v2` and kombu's serializer, and pushes it in the same
Lua script that writes the received-message ledger entry: one round trip for record-and-enqueue,
and never one without the other. tests/unit/test_publish.py pins the document against what
Celery itself writes.
"""

from __future__ import annotations

import base64
import json
import uuid

from celery import Celery
from kombu.serialization import dumps

from fleettune.workers.worker.app import INGEST_QUEUE

TASK = "fleettune.ingest"


class RedisPublisher:
    queue = INGEST_QUEUE

    def __init__(self, app: Celery) -> None:
        self.app = app

    def message(self, raw: bytes, sent_at: float) -> bytes:
        """The document kombu's Redis transport would LPUSH for `send_task(TASK, args=[raw])`."""
        task_id = str(uuid.uuid4())
        task = self.app.amqp.as_task_v2(task_id, TASK, args=[raw], kwargs={})
        # what send_task adds: its ignore_result option (unset) and the caller's headers
        headers = dict(task.headers, ignore_result=None, fleettune_sent_at=sent_at)
        content_type, content_encoding, body = dumps(task.body, serializer="msgpack")
        properties = dict(task.properties, reply_to=self.app.thread_oid, delivery_mode=2, priority=0,
                          delivery_info={"exchange": "", "routing_key": self.queue}, body_encoding="base64",
                          delivery_tag=str(uuid.uuid4()))
        return json.dumps({
            "body": base64.b64encode(body).decode(), "content-encoding": content_encoding,
            "content-type": content_type, "headers": headers, "properties": properties,
        }).encode()
