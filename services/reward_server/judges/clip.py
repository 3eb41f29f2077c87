"""CLIP-style dual encoders scoring an image against the prompt's text (``kind: clip``)."""

from __future__ import annotations

import asyncio
import math
from typing import ClassVar, Literal

from pydantic import Field

from referee.protocol import Prompt, content_text, image_parts

from ..engine_types import NOT_PER_ITEM
from ..judge_settings import EngineJudgeSettings
from .base import JudgeConfigError, Rating, RequestContext, _describe
from .classifier import ClassifierJudge


class ClipSettings(EngineJudgeSettings):
    kind: Literal["clip"] = "clip"
    logit_scale: float | None = Field(
        None,
        gt=0,
        description="The factor on the cosine similarity (default: the checkpoint's trained "
        "logit_scale, exp of its stored value, e.g. 100 for PickScore).",
    )


def checkpoint_logit_scale(path: str) -> float | None:
    """exp(logit_scale) as stored in a CLIP checkpoint (vLLM does not load it), else None."""
    from pathlib import Path

    from safetensors import safe_open

    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            if "logit_scale" in f.keys():  # noqa: SIM118 -- a safetensors handle, not a dict
                return math.exp(float(f.get_tensor("logit_scale").reshape(-1)[0]))
    return None


class ClipJudge(ClassifierJudge):
    """A CLIP-style dual encoder scoring an image against the prompt's text, as PickScore (Kirstain
    et al. 2023, Pick-a-Pic) and HPS v2 do: score = logit_scale x cos(text embedding, image
    embedding), and a pair's preference is the softmax of the two scores, which is Bradley-Terry on
    them, so a group's win rates need N image embeddings and one text embedding. vLLM's pooling
    runner serves ``CLIPModel`` (both towers and their projections); the trained ``logit_scale``,
    which vLLM does not load, is read from the checkpoint."""

    settings: ClipSettings  # type: ignore[assignment] -- a classifier's methods, not its options

    def __post_init__(self) -> None:
        self.engine.prompts  # noqa: B018 -- fails at start-up where user text cannot be kept out of control
        scale = self.settings.logit_scale or checkpoint_logit_scale(self.engine.model_path)
        if scale is None:
            raise JudgeConfigError(
                f"judge {self.name!r}: the checkpoint {self.settings.model} stores no logit_scale; "
                "set logit_scale in the judge's settings (100 for PickScore-like models)"
            )
        self.logit_scale = scale

    abilities: ClassVar[frozenset[str]] = frozenset()  # its text tower alone is no reward model

    @property
    def media(self) -> list[str]:
        return ["image"]

    def validate(self, where: str, prompt: Prompt, response) -> None:
        """A clip judge scores exactly one image per response against the prompt's text."""
        if not isinstance(prompt, str) and any(image_parts(m.content) for m in prompt):
            raise ValueError(
                f"{where}: a clip judge scores images against the prompt's text; the prompt holds an image"
            )
        if len(image_parts(response)) != 1 or content_text(response).strip():
            raise ValueError(
                f"{where}: a clip judge scores one image per response; send exactly one image part "
                "and no text"
            )

    def _caption(self, prompt: Prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        users = [m for m in prompt if m.role == "user"]
        return content_text((users or prompt)[-1].content)

    def _text_ids(self, caption: str) -> list[int]:
        ids = self.engine.plain_ids([caption])
        limit = self.engine.max_model_len
        # CLIP's text tower reads the end-of-text token: truncate the caption, keep the last token
        return ids if len(ids) <= limit else ids[: limit - 1] + ids[-1:]

    async def _shared(self, ctx: RequestContext, key, make):
        """One engine request per distinct text or image of a request, whatever uses it."""
        task = ctx.shared.get(key)
        if task is None:
            task = ctx.shared[key] = asyncio.ensure_future(make())
        return await asyncio.shield(task)

    async def _embedding(self, ctx: RequestContext, ids: list[int], images: list | None) -> list[float]:
        async def run() -> list[float]:
            ctx.engine_requests += 1
            ctx.prompt_tokens += len(ids)
            try:
                return await self.engine.embed(ids, images=images, **ctx.engine_args())
            finally:
                ctx.engine_done()

        vector = await self._cached(ctx, self._cache_key(ctx, "embed", ids, images or [], None), run)
        norm = math.sqrt(sum(x * x for x in vector))
        if not norm or not math.isfinite(norm):
            raise ValueError(f"the embedding has norm {norm}")
        return [x / norm for x in vector]

    async def rate(self, prompt: Prompt, response, ctx: RequestContext, **_) -> Rating:
        try:
            caption = self._caption(prompt)
            ids = await self.engine.tokenize(lambda: self._text_ids(caption), ctx.tokenize_priority())
            text = await self._shared(ctx, ("text", caption), lambda: self._embedding(ctx, ids, None))
            picture = image_parts(response)[0]._image
            pixels = await self._shared(
                ctx, ("image", id(picture)), lambda: self._embedding(ctx, [], [picture])
            )
        except NOT_PER_ITEM:
            raise
        except Exception as exc:
            return Rating(None, error=_describe(exc))
        score = self.logit_scale * sum(a * b for a, b in zip(text, pixels, strict=True))
        return Rating(score, logit=score)
