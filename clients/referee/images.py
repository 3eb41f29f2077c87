"""Images for judges: build content parts from PIL images, numpy arrays, bytes or paths.

    from referee import Referee, image
    with Referee() as ref:
        ref.winrate(prompt="a red fox in snow", responses=[image(img) for img in group], judge="vlm")

Inline images travel in every request that holds them; ``Referee.upload`` (HTTP) and
``QueueReferee.upload`` (Redis) send an image once and return a part that references it, for an
image used in many requests. The SDK's calls accept the sources themselves where a response or
prompt goes, and turn them into parts (``as_content``).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

from .protocol import ImagePart, ImageURLPart, TextPart

_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF")


def is_image_source(value: Any) -> bool:
    """A PIL image, a numpy array, raw image bytes or a path to an image file."""
    if isinstance(value, bytes | bytearray):
        return bytes(value[:8]).startswith(_MAGIC)
    if isinstance(value, Path):
        return True
    mod = type(value).__module__
    return mod.startswith("PIL.") or (mod == "numpy" and hasattr(value, "shape"))


def image_bytes(source: Any) -> bytes:
    """The file bytes of an image source: bytes as they are, a path's file, PIL and numpy as PNG."""
    if isinstance(source, bytes | bytearray):
        return bytes(source)
    if isinstance(source, str | Path):
        return Path(source).read_bytes()
    if type(source).__module__ == "numpy":
        from PIL import Image

        array = source
        if array.dtype != "uint8":
            if float(array.max(initial=0.0)) <= 1.0:  # floats in [0, 1], as diffusion pipelines give
                array = array * 255.0
            array = array.clip(0, 255).round().astype("uint8")
        source = Image.fromarray(array)
    buffer = io.BytesIO()
    source.save(buffer, format="PNG")
    return buffer.getvalue()


def image(source: Any) -> ImagePart:
    """An inline image part (base64 of the file; PIL images and arrays are sent as PNG)."""
    return ImagePart(data=base64.b64encode(image_bytes(source)).decode())


def blob(blob_id: str) -> ImagePart:
    """A part that references an uploaded image by its id."""
    return ImagePart(blob=blob_id)


def as_content(value: Any) -> Any:
    """A response or prompt as the protocol takes it: image sources become ``[image part]``, lists
    mixing text and image sources become parts; anything else is left as it is."""
    if is_image_source(value):
        return [image(value)]
    if isinstance(value, list) and any(is_image_source(v) for v in value):
        return [
            image(v) if is_image_source(v) else TextPart(text=v) if isinstance(v, str) else v for v in value
        ]
    return value


def has_inline_images(value: Any) -> bool:
    if isinstance(value, ImagePart):
        return value.data is not None
    if isinstance(value, ImageURLPart):
        return True
    if isinstance(value, list | tuple):
        return any(has_inline_images(v) for v in value)
    if hasattr(value, "__dict__") and hasattr(value, "model_fields"):
        return any(has_inline_images(getattr(value, f)) for f in type(value).model_fields)
    return False
