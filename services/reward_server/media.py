"""Images in requests: decoding under limits, and the store of uploaded images.

An image reaches a judge inline (base64 ``data``, or an OpenAI ``data:`` URL) or by reference to a
blob uploaded before (``POST /blobs``; ``QueueReferee.upload`` through Redis). A GRPO group of
images at 1024² is tens of megabytes, and each image appears in 2(N-1) comparisons, so clients
upload once and reference many times; inside one request every distinct image is decoded once,
whatever the number of comparisons it takes part in.

Nothing is fetched from a URL: a server that fetched client-named URLs could be made to reach
internal services (server-side request forgery). Limits are checked before pixels are decoded:
the file's size, then the width and height its header declares (a small PNG can declare a
gigapixel image), then the format.

Blobs are content-addressed (``sha256:<hex>`` of the file) and kept per tenant: a tenant can only
reference what it uploaded itself, so knowing another tenant's image hash reveals nothing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import time
import warnings
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from referee.protocol import BlobInfo, ImagePart, ImageURLPart, Message, TextPart

from .settings import MediaSettings

MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


class MediaError(Exception):
    """A client's image cannot be used: 413 (over a limit, naming it) or 422 (naming the item)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def blob_id(raw: bytes) -> str:
    return "sha256:" + hashlib.sha256(raw).hexdigest()


@dataclass
class Decoded:
    image: object  # PIL.Image.Image, RGB
    media_type: str
    width: int
    height: int


@dataclass
class Probed:
    """An image whose header has been read and checked; its pixels are not decoded yet."""

    image: Any  # a PIL image opened lazily
    where: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def probe_image(raw: bytes, where: str, settings: MediaSettings) -> Probed:
    """Read an image file's header and check it against the limits, without decoding its pixels."""
    from PIL import Image

    if len(raw) > settings.max_image_bytes:
        raise MediaError(
            413,
            "too_large",
            f"{where}: the image file has {len(raw)} bytes, over the limit of {settings.max_image_bytes} "
            "(media.max_image_bytes); send a smaller or more compressed image",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw), formats=list(settings.formats))  # reads the header only
    except Image.UnidentifiedImageError:
        raise MediaError(
            422,
            "bad_media",
            f"{where}: not a decodable image in an accepted format ({', '.join(settings.formats)})",
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MediaError(
            413, "too_large", f"{where}: the image declares too many pixels (media.max_image_pixels)"
        ) from None
    width, height = img.size
    if width * height > settings.max_image_pixels:
        raise MediaError(
            413,
            "too_large",
            f"{where}: the image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{settings.max_image_pixels} (media.max_image_pixels); resize it",
        )
    return Probed(img, where, width, height)


def load_image(probed: Probed) -> Decoded:
    """Decode a probed image's pixels (blocking: run it in a thread)."""
    img = probed.image
    try:
        img.load()
        if img.mode == "RGB":
            rgb = img  # no copy: a 4096² image is 48 MiB of RGB
        else:
            rgb = img.convert("RGB")
            img.close()  # the decoded original is not kept beside its RGB copy
    except Exception as exc:
        raise MediaError(
            422, "bad_media", f"{probed.where}: the image could not be decoded ({exc})"
        ) from None
    return Decoded(rgb, MEDIA_TYPES[img.format], probed.width, probed.height)


def decode_image(raw: bytes, where: str, settings: MediaSettings) -> Decoded:
    """Check and decode an image file under the limits (blocking: run it in a thread)."""
    return load_image(probe_image(raw, where, settings))


def _b64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(422, "bad_media", f"{where}: `data` is not valid base64") from None


def inline_bytes(part: ImagePart | ImageURLPart, where: str) -> bytes | None:
    """The bytes of an inline image (None for a blob reference)."""
    if isinstance(part, ImagePart):
        return None if part.data is None else _b64(part.data, where)
    url = part.image_url.url
    if not url.startswith("data:"):
        raise MediaError(
            422,
            "bad_media",
            f"{where}: image URLs are not fetched ({url[:40]!r}); send the image inline as a data: URL "
            "or base64 `data`, or upload it once (POST /blobs) and send {type: image, blob: id}",
        )
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise MediaError(422, "bad_media", f"{where}: only base64 data: URLs are accepted")
    return _b64(payload, where)


# ---------------------------------------------------------------- the blob store


class BlobStore(Protocol):
    async def put(self, tenant: str, raw: bytes) -> float:
        """Keep ``raw`` for the tenant; returns its time to live (s). MediaError over a budget."""

    async def get(self, tenant: str, blob: str) -> bytes | None: ...


class MemoryBlobStore:
    """Blobs in this process (a server without the queue): least recently used first out beyond
    ``blob_store_bytes``, each expiring ``blob_ttl_s`` after its last upload."""

    def __init__(self, settings: MediaSettings, clock=time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._blobs: OrderedDict[tuple[str, str], tuple[bytes, float]] = OrderedDict()
        self.bytes = 0

    def _expire(self) -> None:
        now = self._clock()
        for key in [k for k, (_, exp) in self._blobs.items() if exp <= now]:
            self._drop(key)

    def _drop(self, key) -> None:
        raw, _ = self._blobs.pop(key)
        self.bytes -= len(raw)

    def tenant_bytes(self, tenant: str) -> int:
        return sum(len(raw) for (t, _), (raw, _) in self._blobs.items() if t == tenant)

    async def put(self, tenant: str, raw: bytes) -> float:
        self._expire()
        key = (tenant, blob_id(raw))
        if key in self._blobs:
            self._drop(key)
        used = self.tenant_bytes(tenant)
        if used + len(raw) > self.settings.tenant_blob_bytes:
            raise MediaError(
                413,
                "too_large",
                f"this upload would make {used + len(raw)} bytes of images kept for you, over the limit "
                f"of {self.settings.tenant_blob_bytes} (media.tenant_blob_bytes); reference what you "
                f"uploaded, or wait for older uploads to expire ({self.settings.blob_ttl_s:g} s)",
            )
        self._blobs[key] = (raw, self._clock() + self.settings.blob_ttl_s)
        self.bytes += len(raw)
        while self.bytes > self.settings.blob_store_bytes and len(self._blobs) > 1:
            self._drop(next(iter(self._blobs)))
        return self.settings.blob_ttl_s

    async def get(self, tenant: str, blob: str) -> bytes | None:
        self._expire()
        hit = self._blobs.get((tenant, blob))
        if hit is None:
            return None
        self._blobs.move_to_end((tenant, blob))
        return hit[0]


# A value's size is checked in Redis before it is read: {0} missing, {2, size} too large, {1, bytes}.
_BOUNDED_GET = """
local size = redis.call('STRLEN', KEYS[1])
if size == 0 then return {0, 0} end
if size > tonumber(ARGV[1]) then return {2, size} end
return {1, redis.call('GET', KEYS[1])}
"""


class RedisBlobStore:
    """Blobs in Redis (the queue is on): shared by every replica and by queued jobs, under the
    tenant's namespace (``{prefix}:{t:<tenant>}:blob:<hex>``), expiring ``blob_ttl_s`` after their
    last upload. A tenant's uploads within the TTL are counted in ``...:blob-bytes``."""

    def __init__(self, redis, prefix: str, settings: MediaSettings) -> None:
        from referee.keys import Keys
        from referee.scripts import BLOB

        self.redis, self.prefix, self.settings = redis, prefix, settings
        self._keys = Keys
        self._blob = redis.register_script(BLOB)  # EVALSHA, loading it on NOSCRIPT
        self._get = redis.register_script(_BOUNDED_GET)

    def _ns(self, tenant: str):
        return self._keys(self.prefix, tenant)

    async def put(self, tenant: str, raw: bytes) -> float:
        keys = self._ns(tenant)
        digest = blob_id(raw).removeprefix("sha256:")
        code, *rest = await self._blob(
            keys=[keys.blob(digest), keys.blob_bytes], args=[raw, keys.tenant_limits]
        )
        if int(code) == 4:
            raise MediaError(
                503, "unavailable", "the queue's consumer has not published its limits yet; retry"
            )
        if int(code) != 1:
            raise MediaError(413, "too_large", blob_refusal(int(code), rest, self.settings.blob_ttl_s))
        return self.settings.blob_ttl_s

    async def get(self, tenant: str, blob: str) -> bytes | None:
        """The upload's bytes, checked: a value written by hand under a blob key (a tenant's Redis
        user can) is refused unread if it is over ``max_image_bytes``, and refused if its content
        is not the image its id names."""
        key = self._ns(tenant).blob(blob.removeprefix("sha256:"))
        found, value = await self._get(keys=[key], args=[self.settings.max_image_bytes])
        if int(found) == 0:
            return None
        if int(found) == 2:
            raise MediaError(
                413,
                "too_large",
                f"the upload {blob} has {int(value)} bytes, over the limit of "
                f"{self.settings.max_image_bytes} (media.max_image_bytes)",
            )
        if blob_id(value) != blob:
            raise MediaError(422, "bad_media", f"the upload {blob} does not hold the image its id names")
        return value


def blob_limits(service) -> dict[str, int]:
    """The upload limits the consumers publish in the queue's limits hash (the BLOB script reads
    them there, so a sender cannot choose its own)."""
    m = getattr(getattr(service, "settings", None), "media", None) or MediaSettings()
    return {
        "blob_ttl_ms": int(m.blob_ttl_s * 1000),
        "max_image_bytes": m.max_image_bytes,
        "tenant_blob_bytes": m.tenant_blob_bytes,
    }


def blob_redis(queue_settings):
    """A Redis client for blob bytes (binary: the queue's own clients decode replies as text)."""
    from referee.connection import connect

    return connect(
        queue_settings.url,
        decode_responses=False,
        socket_timeout=queue_settings.socket_timeout_s,
        socket_connect_timeout=queue_settings.socket_timeout_s,
    )


def blob_refusal(code: int, rest: list, ttl_s: float) -> str:
    """The message for a refused Redis blob upload (the BLOB script's codes)."""
    if code == 2:
        return (
            f"the image file has {rest[0]} bytes, over the limit of {rest[1]} (media.max_image_bytes); "
            "send a smaller or more compressed image"
        )
    return (
        f"this upload would make {rest[0]} bytes of images kept for you, over the limit of {rest[1]} "
        f"(media.tenant_blob_bytes); reference what you uploaded, or wait for older uploads to "
        f"expire ({ttl_s:g} s)"
    )


async def upload(store: BlobStore, tenant: str, raw: bytes, settings: MediaSettings) -> BlobInfo:
    """Check that ``raw`` is an acceptable image, keep it, and describe it."""
    decoded = await asyncio.to_thread(decode_image, raw, "the upload", settings)
    ttl = await store.put(tenant, raw)
    return BlobInfo(
        id=blob_id(raw),
        bytes=len(raw),
        media_type=decoded.media_type,
        width=decoded.width,
        height=decoded.height,
        expires_in=ttl,
    )


# ---------------------------------------------------------------- resolving a request's images


def request_parts(named: Iterable[tuple[str, object]]) -> list[tuple[str, ImagePart | ImageURLPart]]:
    """Every image part of a request's contents, with where it is (``items[0].response_a[1]``)."""
    found = []
    for where, value in named:
        if value is None or isinstance(value, str):
            continue
        if isinstance(value, list) and value and isinstance(value[0], Message):
            for k, m in enumerate(value):
                found += request_parts([(f"{where}[{k}].content", m.content)])
            continue
        found += [(f"{where}[{k}]", p) for k, p in enumerate(value) if not isinstance(p, TextPart)]
    return found


@dataclass
class MediaPlan:
    """A request's images, fetched and checked (headers, counts, the pixel budget) but not decoded:
    what ``decode`` turns into pixels once the request has been admitted."""

    parts: list[tuple[str, Any]]
    keys: list[str]
    probed: dict[str, Probed]

    @property
    def images(self) -> int:
        return len(self.probed)

    @property
    def pixels(self) -> int:
        return sum(p.pixels for p in self.probed.values())


async def probe(
    parts: list[tuple[str, ImagePart | ImageURLPart]],
    store: BlobStore,
    tenant: str,
    settings: MediaSettings,
) -> MediaPlan:
    """Fetch each distinct image of a request once (inline, or an upload of this tenant's), read its
    header and check the limits, the request's pixel budget included, before anything is decoded.
    MediaError names the first bad item."""
    raws: dict[str, tuple[str, bytes]] = {}
    keys: list[str] = []
    for where, part in parts:
        raw = inline_bytes(part, where)
        if raw is None:
            key = part.blob
            if key not in raws:
                raw = await store.get(tenant, key)
                if raw is None:
                    raise MediaError(
                        422,
                        "unknown_blob",
                        f"{where}: no uploaded image {key} (never uploaded by you, or expired after "
                        f"{settings.blob_ttl_s:g} s); upload it again (POST /blobs) and resend",
                    )
        else:
            key = blob_id(raw)
        if key not in raws:
            if len(raws) >= settings.max_images:
                raise MediaError(
                    413,
                    "too_large",
                    f"this request holds more than {settings.max_images} distinct images "
                    "(media.max_images); split it",
                )
            raws[key] = (where, raw)
        keys.append(key)
    probed: dict[str, Probed] = {}
    total = 0
    for key, (where, raw) in raws.items():
        probed[key] = p = probe_image(raw, where, settings)
        total += p.pixels
        if total > settings.max_request_pixels:
            raise MediaError(
                413,
                "too_large",
                f"this request's distinct images hold more than {settings.max_request_pixels} pixels "
                f"together (media.max_request_pixels; {where} brings it to {total}); send fewer or "
                "smaller images per request",
            )
    return MediaPlan(parts, keys, probed)


async def decode(plan: MediaPlan) -> int:
    """Decode every distinct image of the plan once and attach it to its parts (``part._image``).
    Returns the number of distinct images."""
    decoded: dict[str, Decoded] = {}
    for key, probed in plan.probed.items():
        decoded[key] = await asyncio.to_thread(load_image, probed)
        decoded[key].image.info["referee_sha256"] = key  # the judgment cache keys an image by content
    for (_, part), key in zip(plan.parts, plan.keys, strict=True):
        part._image = decoded[key].image
    return len(decoded)


class PixelBudget:
    """Decoded pixels held by admitted requests, all together and per tenant.

    ``media.max_request_pixels`` bounds one request; this bounds what every admitted request holds
    at once (each keeps its decoded images until it is answered), so that many requests at their
    own budget cannot exhaust the server's memory between them. With several tenants one tenant
    holds at most ``share`` of the total, so another tenant's images always find room. A request
    waits for room (first come, first served among those that fit) up to ``timeout_s``."""

    def __init__(self, total: int, share: float | None = None) -> None:
        self.total, self.share = total, share
        self.used = 0
        self.by_tenant: Counter[str] = Counter()
        self._room = asyncio.Condition()

    def tenant_cap(self) -> int:
        return self.total if self.share is None else max(1, int(self.total * self.share))

    def _fits(self, pixels: int, tenant: str) -> bool:
        return self.used + pixels <= self.total and self.by_tenant[tenant] + pixels <= self.tenant_cap()

    @asynccontextmanager
    async def hold(self, pixels: int, tenant: str, timeout_s: float) -> AsyncIterator[None]:
        """Hold ``pixels`` for the body of the block. MediaError 413 if they can never fit, 429
        (``overloaded``) if no room was made within ``timeout_s``."""
        if pixels <= 0:
            yield
            return
        cap = self.tenant_cap()
        if pixels > cap:
            raise MediaError(
                413,
                "too_large",
                f"the request's images are {pixels} pixels, more than one tenant may hold decoded at once "
                f"({cap}: limits.tenant_share of media.max_decoded_pixels); send fewer or smaller images",
            )
        async with self._room:
            try:
                await asyncio.wait_for(self._room.wait_for(lambda: self._fits(pixels, tenant)), timeout_s)
            except TimeoutError:
                raise MediaError(
                    429,
                    "overloaded",
                    f"no room to decode the request's {pixels} pixels within {timeout_s:g}s "
                    f"(media.max_decoded_pixels {self.total} held by admitted requests, "
                    f"{self.by_tenant[tenant]} of them this tenant's); retry later",
                ) from None
            self.used += pixels
            self.by_tenant[tenant] += pixels
        try:
            yield
        finally:
            async with self._room:
                self.used -= pixels
                self.by_tenant[tenant] -= pixels
                if self.by_tenant[tenant] <= 0:
                    del self.by_tenant[tenant]
                self._room.notify_all()


async def resolve(
    parts: list[tuple[str, ImagePart | ImageURLPart]],
    store: BlobStore,
    tenant: str,
    settings: MediaSettings,
) -> int:
    """``probe`` then ``decode``: every part gets its decoded image. Returns the distinct images."""
    return await decode(await probe(parts, store, tenant, settings))
