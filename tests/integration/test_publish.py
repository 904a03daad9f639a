"""The gateway's Redis publish writes the document Celery itself writes for the same task.

Both are captured from a real redis-server, where kombu's transport LPUSHes them; the
integration tests that submit through the API then show workers consuming the gateway's.
"""

import base64
import json

import msgpack
import pytest
import redis

from fleettune.shared.settings import Settings
from fleettune.workers.worker.app import enqueuer, make_app
from fleettune.workers.worker.publish import RedisPublisher

pytestmark = pytest.mark.services
IDS = {"id", "root_id", "origin"}  # per message or per process
PROPERTY_IDS = {"correlation_id", "delivery_tag", "reply_to"}


def test_the_document_matches_celerys_own_field_for_field(redis_url):
    url = redis_url.rsplit("/", 1)[0] + "/10"
    client = redis.Redis.from_url(url)
    app = make_app(Settings(redis_url=url))
    enqueuer(app)(b"\x01\x02envelope", 123.5)
    theirs = json.loads(client.rpop("fleettune.ingest"))
    ours = json.loads(RedisPublisher(app).message(b"\x01\x02envelope", 123.5))

    assert ours.keys() == theirs.keys()
    assert {k: v for k, v in ours.items() if k not in ("headers", "properties", "body")} == \
        {k: v for k, v in theirs.items() if k not in ("headers", "properties", "body")}
    assert {k: v for k, v in ours["headers"].items() if k not in IDS} == \
        {k: v for k, v in theirs["headers"].items() if k not in IDS}
    assert {k: v for k, v in ours["properties"].items() if k not in PROPERTY_IDS} == \
        {k: v for k, v in theirs["properties"].items() if k not in PROPERTY_IDS}
    assert ours["properties"].keys() == theirs["properties"].keys()
    assert msgpack.unpackb(base64.b64decode(ours["body"])) == msgpack.unpackb(base64.b64decode(theirs["body"]))
    assert ours["headers"]["id"] == ours["headers"]["root_id"] == ours["properties"]["correlation_id"]
