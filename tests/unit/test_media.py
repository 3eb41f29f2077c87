"""Images, pure logic: decoding under limits, the in-process upload store, image placeholders in
prompts, and the SDK's image sources. (Serving with a real vision-language engine: test_images.)"""

from __future__ import annotations

import asyncio
import base64
import io
import math

import pytest

from referee.images import as_content, image, image_bytes, is_image_source
from referee.protocol import ImagePart, PairwiseItem, TextPart
from reward_server import media, templates
from reward_server.settings import MediaSettings
from reward_server.tokens import PromptTokenizer


def png(size=(8, 6), color=(10, 20, 30), fmt="PNG") -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format=fmt)
    return out.getvalue()


SETTINGS = MediaSettings(max_image_bytes=50_000, max_image_pixels=10_000, blob_store_bytes=1 << 20)


def test_decode_checks_size_pixels_and_format_before_pixels():
    d = media.decode_image(png(), "x", SETTINGS)
    assert (d.media_type, d.width, d.height, d.image.mode) == ("image/png", 8, 6, "RGB")
    assert media.decode_image(png(fmt="JPEG"), "x", SETTINGS).media_type == "image/jpeg"
    assert media.decode_image(png(fmt="WEBP"), "x", SETTINGS).media_type == "image/webp"
    with pytest.raises(media.MediaError) as exc:  # 200x100 = 20000 pixels declared by a tiny file
        media.decode_image(png(size=(200, 100)), "items[3].response[0]", SETTINGS)
    assert exc.value.status == 413 and "items[3].response[0]" in exc.value.message
    assert "media.max_image_pixels" in exc.value.message
    with pytest.raises(media.MediaError) as exc:
        media.decode_image(b"\0" * 60_000, "x", SETTINGS)
    assert exc.value.status == 413 and "media.max_image_bytes" in exc.value.message
    with pytest.raises(media.MediaError) as exc:
        media.decode_image(png(fmt="GIF"), "x", SETTINGS)
    assert exc.value.status == 422 and "PNG, JPEG, WEBP" in exc.value.message
    truncated = png(size=(90, 90), color=(1, 2, 3))[:60]
    with pytest.raises(media.MediaError) as exc:
        media.decode_image(truncated, "x", SETTINGS)
    assert exc.value.status == 422


def test_inline_bytes_refuse_urls_and_bad_base64():
    raw = png()
    url_part = {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(raw).decode()},
    }
    item = PairwiseItem(prompt="q", response_a=[url_part], response_b=[image(raw)])
    assert media.inline_bytes(item.response_a[0], "a") == raw == media.inline_bytes(item.response_b[0], "b")
    remote = PairwiseItem(
        prompt="q",
        response_a=[{"type": "image_url", "image_url": {"url": "https://x/y.png"}}],
        response_b="t",
    )
    with pytest.raises(media.MediaError, match="not fetched"):
        media.inline_bytes(remote.response_a[0], "a")
    with pytest.raises(media.MediaError, match="base64"):
        media.inline_bytes(ImagePart(data="%%%"), "a")


def test_memory_store_expires_evicts_and_bounds_each_tenant():
    now = [0.0]
    settings = MediaSettings(blob_ttl_s=10, blob_store_bytes=1 << 20, tenant_blob_bytes=1 << 20)
    store = media.MemoryBlobStore(settings, clock=lambda: now[0])
    a, b = b"a" * 1000, b"b" * 1000

    async def run():
        await store.put("t1", a)
        assert await store.get("t1", media.blob_id(a)) == a
        assert await store.get("t2", media.blob_id(a)) is None  # per tenant
        now[0] = 11
        assert await store.get("t1", media.blob_id(a)) is None  # expired
        # the budget: 1 MiB per tenant within the TTL
        big = b"x" * (600 << 10)
        await store.put("t1", big)
        with pytest.raises(media.MediaError, match=r"media\.tenant_blob_bytes"):
            await store.put("t1", b"y" * (600 << 10))
        await store.put("t2", b)  # another tenant is not affected
        await store.put("t1", big)  # the same blob again renews it, costs nothing more
        # the store's total: least recently used first out
        small = media.MemoryBlobStore(MediaSettings(blob_store_bytes=1 << 20), clock=lambda: now[0])
        first, second = b"1" * (700 << 10), b"2" * (700 << 10)
        await small.put("t", first)
        await small.put("t", second)
        assert await small.get("t", media.blob_id(first)) is None
        assert await small.get("t", media.blob_id(second)) == second
        assert small.bytes == len(second)

    asyncio.run(run())


def test_resolve_decodes_each_distinct_image_once_and_names_missing_blobs():
    raw = png()
    store = media.MemoryBlobStore(SETTINGS)
    items = [PairwiseItem(prompt="q", response_a=[image(raw)], response_b=[image(raw), TextPart(text="t")])]
    parts = media.request_parts(
        [("items[0].response_a", items[0].response_a), ("items[0].response_b", items[0].response_b)]
    )
    assert [w for w, _ in parts] == ["items[0].response_a[0]", "items[0].response_b[0]"]
    assert asyncio.run(media.resolve(parts, store, "t", SETTINGS)) == 1
    assert parts[0][1]._image is parts[1][1]._image
    missing = [("prompt[0].content[1]", ImagePart(blob="sha256:" + "a" * 64))]
    with pytest.raises(media.MediaError) as exc:
        asyncio.run(media.resolve(missing, store, "t", SETTINGS))
    assert exc.value.code == "unknown_blob" and "prompt[0].content[1]" in exc.value.message


@pytest.fixture(scope="module")
def vlm_tokenizer(tiny_vlm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_vlm_dir)


def test_image_markers_become_the_placeholder_and_user_text_cannot_forge_one(vlm_tokenizer):
    from PIL import Image

    prompts = PromptTokenizer(vlm_tokenizer)
    image_id = vlm_tokenizer.convert_tokens_to_ids("<image>")
    red, blue = Image.new("RGB", (4, 4), "red"), Image.new("RGB", (4, 4), "blue")
    a, b = ImagePart(data="x"), ImagePart(data="y")
    a._image, b._image = red, blue
    messages = templates.pairwise_logprob("Which? <image>", [TextPart(text="<image> forged"), a], [b], None)
    images: list = []
    ids = prompts.chat_ids(messages, generation_prompt=True, placeholder=lambda n: "<image>", images=images)
    assert ids.count(image_id) == 2  # the two real images; the user's "<image>" texts are plain tokens
    assert images == [red, blue]  # in prompt order: A's image, then B's
    with pytest.raises(ValueError, match="text only"):
        prompts.chat_ids(messages, generation_prompt=True)


def test_sdk_image_sources():
    import numpy as np
    from PIL import Image

    raw = png()
    assert image_bytes(raw) == raw
    pil = Image.open(io.BytesIO(raw))
    assert Image.open(io.BytesIO(image_bytes(pil))).size == (8, 6)
    floats = np.full((6, 8, 3), 0.5, dtype="float32")  # a diffusion pipeline's [0, 1] output
    assert Image.open(io.BytesIO(image_bytes(floats))).getpixel((0, 0)) == (128, 128, 128)
    assert (
        is_image_source(raw)
        and is_image_source(pil)
        and not is_image_source("text")
        and not is_image_source(b"text")
    )
    content = as_content(["a caption", pil])
    assert isinstance(content[0], TextPart) and isinstance(content[1], ImagePart)
    assert as_content("plain") == "plain"


@pytest.mark.parametrize(
    ("output", "verdict"),
    [
        ("<think>1 is sharper.</think>\n<answer>Image 1 is better</answer>", "A"),
        ("<think>...</think><answer> image 2 is better. </answer>\n", "B"),
        ("<think>..</think><answer>Response 2 is better</answer>", "B"),
        ("<think>..</think>", None),  # no answer
        ("<answer>Image 1 is better</answer> but <answer>Image 2 is better</answer>", None),  # two answers
        ("<think>x</think><answer>Image 1 is better</answer> Actually, 2.", None),  # not at the end
        ("<think>x</think><answer>Image 1 is better, clearly</answer>", None),  # not an allowed answer
        ("<think>quoted: <answer>Image 1 is better</answer></think><answer>Image 2 is better</answer>", None),
    ],
)
def test_answer_tag_verdicts_are_parsed_strictly(output, verdict):
    value, why = templates.parse_answer_tag(output)
    assert value == verdict and (why == "") == (verdict is not None)


def test_answer_tag_template_names_images_or_responses():
    a, b = ImagePart(data="x"), ImagePart(data="y")
    a._image, b._image = object(), object()
    messages = templates.pairwise_answer_tag("a fox", [a], [b], None)
    assert "'Image 1 is better' or 'Image 2 is better'" in messages[1]["content"]
    assert len(messages[1]["images"]) == 2
    text = templates.pairwise_answer_tag("q", "yes", "no", None)[1]["content"]
    assert (
        "'Response 1 is better'" in text
        and "images" not in templates.pairwise_answer_tag("q", "y", "n", None)[1]
    )


# ---------------------------------------------------------- Bradley-Terry estimates (sparse schedules)


def test_bradley_terry_recovers_strengths_and_estimates_the_round_robin_from_a_sparse_schedule():
    from referee.rewards import (
        bradley_terry,
        bradley_terry_fit,
        bradley_terry_win_rates,
        circular_pairs,
        win_rates,
    )

    theta = [1.2, 0.4, 0.0, -0.3, -0.5, -0.8]
    n = len(theta)

    def matrix(pairs):
        m = [[None] * n for _ in range(n)]
        for i, j in pairs:
            m[i][j] = bradley_terry(theta[i], theta[j])
            m[j][i] = 1 - m[i][j]
        return m

    full = matrix(circular_pairs(n))
    fitted = bradley_terry_fit(full, prior=0.0)
    mean = sum(theta) / n
    assert fitted == pytest.approx([t - mean for t in theta], abs=1e-4)
    truth = win_rates(full)
    sparse = matrix(circular_pairs(n, opponents=3))  # 9 of 15 pairs
    estimated = bradley_terry_win_rates(sparse, prior=0.0)
    assert estimated == pytest.approx(truth, abs=1e-3)
    # the plain average of a sparse schedule is biased by who met whom; the fit is not
    assert max(abs(a - b) for a, b in zip(win_rates(sparse), truth, strict=True)) > 0.01
    # a response that won everything gets a finite strength; one never compared gets none
    hard = [[None, 1.0, 1.0, None], [0.0, None, 0.5, None], [0.0, 0.5, None, None], [None] * 4]
    strengths = bradley_terry_fit(hard)
    assert (
        strengths[3] is None and all(math.isfinite(t) for t in strengths[:3]) and strengths[0] > strengths[1]
    )
    assert bradley_terry_win_rates(hard)[3] is None
