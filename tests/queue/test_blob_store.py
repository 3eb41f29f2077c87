"""Uploaded images in Redis, read back under the limits: a tenant's Redis user can write a value under
its own blob keys by hand, so the server checks a value's size in Redis before reading it, and that
its content is the image its id names."""

from __future__ import annotations

import io
import uuid

import pytest
from redis.asyncio import Redis

from referee.keys import Keys
from reward_server import media
from reward_server.settings import MediaSettings
from tests.support import REDIS_URL


def png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture()
async def store():
    prefix = f"referee-test-blobs-{uuid.uuid4().hex[:8]}"
    redis = Redis.from_url(REDIS_URL)
    settings = MediaSettings(max_image_bytes=64 * 1024)
    yield media.RedisBlobStore(redis, prefix, settings), redis, Keys(prefix, "team")
    keys = [k async for k in redis.scan_iter(f"{prefix}:*")]
    if keys:
        await redis.delete(*keys)
    await redis.aclose()


async def test_an_oversized_value_under_a_blob_key_is_refused_unread(store, monkeypatch):
    blobs, redis, keys = store
    fake = "sha256:" + "ab" * 32
    await redis.set(keys.blob("ab" * 32), b"x" * (1 << 20))  # by hand: 1 MiB, over the 64 KiB limit
    largest = []
    real = redis.execute_command

    async def recording(*args, **kwargs):
        reply = await real(*args, **kwargs)
        largest.append(
            max((len(x) for x in reply if isinstance(x, bytes)), default=0) if isinstance(reply, list) else 0
        )
        return reply

    monkeypatch.setattr(redis, "execute_command", recording)
    with pytest.raises(media.MediaError) as refused:
        await blobs.get("team", fake)
    assert refused.value.status == 413 and "media.max_image_bytes" in refused.value.message
    assert max(largest) < 1024  # the megabyte never left Redis


async def test_a_value_that_is_not_the_image_its_id_names_is_refused(store):
    blobs, redis, keys = store
    real = png()
    other = media.blob_id(real).removeprefix("sha256:")[::-1]  # a well-formed id of other content
    await redis.set(keys.blob(other), real)
    with pytest.raises(media.MediaError) as refused:
        await blobs.get("team", f"sha256:{other}")
    assert refused.value.status == 422 and "does not hold the image its id names" in refused.value.message
    assert await blobs.get("team", "sha256:" + "cd" * 32) is None  # never uploaded


async def test_an_honest_upload_reads_back(store):
    blobs, redis, keys = store
    raw = png()
    await redis.set(keys.blob(media.blob_id(raw).removeprefix("sha256:")), raw)
    assert await blobs.get("team", media.blob_id(raw)) == raw
