"""Judges: a configured model and the questions it can answer.

A judge answers one comparison or one rating at a time as a coroutine; callers gather many of
them at once so that they all sit in the engine together and vLLM batches them. Each coroutine
returns its own outcome, errors included, so one failing item never fails or neutralises another.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any

from referee.protocol import Prompt, content_text, image_parts
from referee.rewards import bradley_terry, verdict_credit

from . import templates
from .cache import cache_key
from .engine import Completion, Engine, EngineDead
from .settings import JudgeSettings


class JudgeConfigError(RuntimeError):
    """The judge cannot be served as configured (raised at start-up, not per request)."""


@dataclass
class RequestContext:
    """What the engine calls of one request share: its place in the fair order and its usage counts."""

    ticket: Any = None  # fairness.Ticket once admitted: hands out the engine priorities
    shared: dict = field(default_factory=dict)  # results several items of the request reuse
    cache: Any = None  # cache.JudgmentCache, unless the request turned it off
    cache_scope: str = "open"  # whose answers may be reused: the tenant's own only
    prompt_tokens: int = 0
    completion_tokens: int = 0
    engine_requests: int = 0
    cached: int = 0  # engine requests answered from the judgment cache instead

    def engine_args(self) -> dict:
        """The next engine call's vLLM priority (lower first) and prefix-cache salt."""
        if self.ticket is None:
            return {"priority": 0}
        args = {"priority": self.ticket.next_priority()}
        if self.ticket.cache_salt is not None:
            args["cache_salt"] = self.ticket.cache_salt
        return args

    def engine_done(self) -> None:
        if self.ticket is not None:
            self.ticket.done += 1


@dataclass
class Comparison:
    """One judged pair in one order, from the perspective of the response shown first."""

    p_first: float | None
    verdict: str  # "A" | "B" | "tie" | "invalid", A meaning the response shown first
    rationale: str | None = None
    attempts: int = 1
    error: str | None = None
    label_mass: float | None = None  # logprob mode: the next-token probability on A and B
    low_label_mass: bool = False  # invalid because label_mass < min_label_mass


@dataclass
class Rating:
    score: float | None
    rationale: str | None = None
    attempts: int = 1
    error: str | None = None
    label_mass: float | None = None  # logprob ratings: the next-token probability on the scale's labels
    logit: float | None = None  # classifiers: the raw reward (score may be its sigmoid)


def _completion_json(out: Completion) -> dict:
    return {**out.__dict__, "first_token_logprobs": [[k, v] for k, v in out.first_token_logprobs.items()]}


def _completion_from_json(data: dict) -> Completion:
    return Completion(
        **{**data, "first_token_logprobs": {int(k): v for k, v in data["first_token_logprobs"]}}
    )


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def verdict_from_probability(p_a: float, margin: float) -> str:
    if abs(p_a - 0.5) <= margin:
        return "tie"
    return "A" if p_a > 0.5 else "B"


def low_mass_error(mass: float, minimum: float, labels: str) -> str:
    return (
        f"the judge put only {mass:.3g} of its next-token probability on {labels} (label mass "
        f"{mass:.3g} < min_label_mass {minimum:g}): it did not answer with a verdict label"
    )


@dataclass
class Judge:
    settings: JudgeSettings
    engine: Engine
    label_ids: dict[str, list[int]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def kind(self) -> str:
        return self.settings.kind

    @property
    def media(self) -> list[str]:
        """What the judge's model sees besides text: ``["image"]`` for a vision-language model."""
        return list(self.engine.media)

    def __post_init__(self) -> None:
        """Subclasses check at start-up that the model can serve them."""

    def validate(self, where: str, prompt: Prompt, response) -> None:
        """Raise ValueError (a 422 naming ``where``) for an item this kind cannot judge."""

    def _cache_key(self, ctx: RequestContext, kind: str, ids: list[int], images: list, options) -> str | None:
        """The judgment cache's key of one engine request (None: not cached)."""
        if ctx.cache is None:
            return None
        digests = [getattr(img, "info", {}).get("referee_sha256") for img in images]
        if any(d is None for d in digests):
            return None
        engine = self.engine
        return cache_key(kind, self.name, engine.model_path, engine.fingerprint, ids, digests, options)

    async def _cached(self, ctx: RequestContext, key: str | None, run, encode=None, decode=None):
        """``run()``'s value, or the same value from the judgment cache (counted in ``ctx.cached``)."""
        if key is None:
            return await run()
        codec = {k: v for k, v in (("encode", encode), ("decode", decode)) if v is not None}
        value, hit = await ctx.cache.get_or_run(self.name, ctx.cache_scope, key, run, **codec)
        if hit:
            ctx.cached += 1
            ctx.engine_done()
        return value

    def shutdown(self) -> None:
        self.engine.shutdown()


class ClassifierJudge(Judge):
    """A sequence-classification reward model: one raw logit per (prompt, response)."""

    routes = ("score", "pairwise", "winrate")
    pairwise_modes = ("logprob",)  # Bradley-Terry on the two scores; no generation involved

    def __post_init__(self) -> None:
        self.engine.prompts  # noqa: B018 -- fails at start-up where user text cannot be kept out of control

    def _messages_ids(self, messages: list[dict]) -> list[int]:
        """Every message content is user data: never a special token (see ``tokens``)."""
        if self.engine.tokenizer.chat_template:
            return self.engine.chat_ids(messages, generation_prompt=False)
        return self.engine.plain_ids([m["content"] for m in messages])

    def _input_ids(self, prompt: Prompt, response: str) -> list[int]:
        messages = (
            [{"role": "user", "content": prompt}]
            if isinstance(prompt, str)
            else [m.model_dump() for m in prompt]
        )
        messages.append({"role": "assistant", "content": response})
        return self._messages_ids(messages)

    async def rate_text(
        self,
        text: str,
        ctx: RequestContext,
        *,
        activation: bool | None = None,
        add_special_tokens: bool = True,
        response: str = "",
    ) -> Rating:
        """Score text that is already formatted for the model (vLLM /classify and OpenRLHF inputs):
        its special tokens are the client's template, its BOS appears once; ``response``, appended
        to it, is user data (OpenRLHF's response part)."""
        return await self._classify(
            lambda: self.engine.text_ids(text, add_special_tokens, data=response), ctx, activation
        )

    async def rate_messages(
        self, messages: list[dict], ctx: RequestContext, *, activation: bool | None = None
    ) -> Rating:
        """Score a conversation (vLLM /classify's chat form) in the model's chat template."""
        return await self._classify(lambda: self._messages_ids(messages), ctx, activation)

    async def rate(self, prompt: Prompt, response: str, ctx: RequestContext) -> Rating:
        return await self._classify(lambda: self._input_ids(prompt, response), ctx, None)

    async def _classify(self, build_ids, ctx: RequestContext, activation: bool | None) -> Rating:
        """One forward pass gives both: the raw logit (what Bradley-Terry compares) and the score the
        caller asked for (the logit, or its sigmoid: vLLM's activation of a one-label classifier)."""
        if activation is None:
            activation = self.settings.activation == "sigmoid"
        try:
            ids = await self.engine.tokenize(build_ids)

            async def run() -> float:
                ctx.engine_requests += 1
                ctx.prompt_tokens += len(ids)
                try:
                    return await self.engine.classify(ids, activation=False, **ctx.engine_args())
                finally:
                    ctx.engine_done()

            logit = await self._cached(ctx, self._cache_key(ctx, "classify", ids, [], None), run)
        except EngineDead:  # not a per-item cause: the request fails, the server exits
            raise
        except Exception as exc:
            return Rating(None, error=_describe(exc))
        if not math.isfinite(logit):
            return Rating(None, error=f"the classifier returned a non-finite score ({logit})")
        return Rating(bradley_terry(logit, 0.0) if activation else logit, logit=logit)

    async def compare(self, prompt: Prompt, first: str, second: str, ctx: RequestContext, **_) -> Comparison:
        ra, rb = await asyncio.gather(self.rate(prompt, first, ctx), self.rate(prompt, second, ctx))
        return self.compare_scores(ra, rb)

    def compare_scores(self, ra: Rating, rb: Rating) -> Comparison:
        """Bradley-Terry on the raw rewards (logits), whatever the activation of the scores."""
        if ra.logit is None or rb.logit is None:
            return Comparison(None, "invalid", error=ra.error or rb.error)
        if ra.logit == rb.logit:
            return Comparison(0.5, "tie")
        p = bradley_terry(ra.logit, rb.logit)
        return Comparison(p, "A" if ra.logit > rb.logit else "B")


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

    routes = ("score", "pairwise", "winrate")
    pairwise_modes = ("logprob",)

    def __post_init__(self) -> None:
        self.engine.prompts  # noqa: B018 -- fails at start-up where user text cannot be kept out of control
        scale = self.settings.logit_scale or checkpoint_logit_scale(self.engine.model_path)
        if scale is None:
            raise JudgeConfigError(
                f"judge {self.name!r}: the checkpoint {self.settings.model} stores no logit_scale; "
                "set logit_scale in the judge's settings (100 for PickScore-like models)"
            )
        self.logit_scale = scale

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

    async def rate(self, prompt: Prompt, response, ctx: RequestContext) -> Rating:
        try:
            caption = self._caption(prompt)
            ids = await self.engine.tokenize(lambda: self._text_ids(caption))
            text = await self._shared(ctx, ("text", caption), lambda: self._embedding(ctx, ids, None))
            picture = image_parts(response)[0]._image
            pixels = await self._shared(
                ctx, ("image", id(picture)), lambda: self._embedding(ctx, [], [picture])
            )
        except EngineDead:
            raise
        except Exception as exc:
            return Rating(None, error=_describe(exc))
        score = self.logit_scale * sum(a * b for a, b in zip(text, pixels, strict=True))
        return Rating(score, logit=score)


class GenerativeJudge(Judge):
    """An instruction-tuned LLM judging through prompt templates (see ``templates``)."""

    routes = ("score", "pairwise", "judge", "winrate")
    pairwise_modes = ("logprob", "cot")

    def __post_init__(self) -> None:
        if not self.engine.tokenizer.chat_template:
            raise JudgeConfigError(
                f"judge {self.name!r}: the model {self.settings.model} has no chat template; a "
                "generative judge must be an instruction-tuned chat model"
            )
        self.scale = templates.Scale(self.settings.scale_low, self.settings.scale_high)
        for label in ["A", "B", *self.scale.labels]:
            ids = [
                tid for text in (label, " " + label) if (tid := self.engine.single_token_id(text)) is not None
            ]
            if not ids:
                raise JudgeConfigError(
                    f"judge {self.name!r}: the label {label!r} is not a single token of this model's "
                    "tokenizer; choose a scale whose labels are (for example scale 1..9)"
                )
            self.label_ids[label] = ids

    def _label_mass(self, logprobs: dict[int, float], label: str) -> float:
        return sum(math.exp(logprobs[t]) for t in self.label_ids[label] if t in logprobs)

    async def _generate(self, messages: list[dict], ctx: RequestContext, **kwargs):
        images: list = []
        ids = await self.engine.tokenize(
            lambda: self.engine.chat_ids(messages, generation_prompt=True, images=images)
        )

        async def run() -> Completion:
            ctx.engine_requests += 1
            try:
                extra = {"images": images} if images else {}
                out = await self.engine.complete(ids, **ctx.engine_args(), **kwargs, **extra)
            finally:
                ctx.engine_done()
            ctx.prompt_tokens += out.prompt_tokens
            ctx.completion_tokens += out.completion_tokens
            return out

        # only what the engine would answer the same way again: greedy, or seeded sampling
        deterministic = kwargs.get("temperature", 0.0) == 0.0 or kwargs.get("seed") is not None
        key = self._cache_key(ctx, "complete", ids, images, sorted(kwargs.items())) if deterministic else None
        return await self._cached(ctx, key, run, encode=_completion_json, decode=_completion_from_json)

    async def compare(
        self,
        prompt: Prompt,
        first: str,
        second: str,
        ctx: RequestContext,
        *,
        mode: str = "logprob",
        rubric: str | None = None,
        max_new_tokens: int | None = None,
        max_retries: int = 0,
        seed: int | None = None,
    ) -> Comparison:
        try:
            if mode == "logprob":
                return await self._compare_logprob(prompt, first, second, rubric, ctx)
            return await self._compare_cot(
                prompt, first, second, rubric, ctx, max_new_tokens, max_retries, seed
            )
        except EngineDead:  # not a per-item cause: the request fails, the server exits
            raise
        except Exception as exc:
            return Comparison(None, "invalid", error=_describe(exc))

    async def _compare_logprob(self, prompt, first, second, rubric, ctx) -> Comparison:
        messages = templates.pairwise_logprob(prompt, first, second, rubric)
        out = await self._generate(messages, ctx, max_tokens=1, top_logprobs=self.settings.top_logprobs)
        pa = self._label_mass(out.first_token_logprobs, "A")
        pb = self._label_mass(out.first_token_logprobs, "B")
        if pa + pb == 0.0:
            return Comparison(
                None,
                "invalid",
                error=f"neither A nor B is among the judge's top {self.settings.top_logprobs} next tokens "
                f"(it began with {out.text!r})",
                label_mass=0.0,
            )
        mass = pa + pb
        if mass < self.settings.min_label_mass:
            # P(A) = pa / (pa + pb) would rest on the tail of the distribution (and is exactly 0 or 1
            # when only one label made the top logprobs): not a verdict.
            return Comparison(
                None,
                "invalid",
                error=low_mass_error(mass, self.settings.min_label_mass, "A and B")
                + f" (it began with {out.text!r})",
                label_mass=mass,
                low_label_mass=True,
            )
        p = pa / mass
        return Comparison(p, verdict_from_probability(p, self.settings.tie_margin), label_mass=mass)

    async def _attempts(self, messages, ctx, max_new_tokens, max_retries, seed, parse):
        """Reason-then-answer with bounded retries; the first attempt is greedy unless configured."""
        budget = max_new_tokens or self.settings.cot_max_new_tokens
        text, why = "", ""
        for attempt in range(max_retries + 1):
            temperature = self.settings.cot_temperature if attempt == 0 else 0.7
            out = await self._generate(
                messages,
                ctx,
                max_tokens=budget,
                temperature=temperature,
                seed=None if seed is None else seed + attempt,
            )
            text = out.text
            value, why = parse(text)
            if value is not None:
                return value, text, attempt + 1, None
            if out.finish_reason == "length":
                why += f" (the reasoning was cut at max_new_tokens={budget})"
        return None, text, max_retries + 1, why

    async def _compare_cot(self, prompt, first, second, rubric, ctx, max_new_tokens, max_retries, seed):
        if self.settings.verdict_format == "answer_tag":
            messages = templates.pairwise_answer_tag(prompt, first, second, rubric)
            parse = templates.parse_answer_tag
        else:
            messages = templates.pairwise_cot(prompt, first, second, rubric)
            parse = templates.parse_verdict
        verdict, text, attempts, why = await self._attempts(
            messages, ctx, max_new_tokens, max_retries, seed, parse
        )
        if verdict is None:
            return Comparison(None, "invalid", rationale=text, attempts=attempts, error=why)
        return Comparison(verdict_credit(verdict), verdict, rationale=text, attempts=attempts)

    async def rate(
        self, prompt: Prompt, response: str, ctx: RequestContext, *, rubric: str | None = None
    ) -> Rating:
        """Expected rating under the judge's probabilities over the scale's labels (one token)."""
        try:
            messages = templates.pointwise_logprob(prompt, response, rubric, self.scale)
            out = await self._generate(messages, ctx, max_tokens=1, top_logprobs=self.settings.top_logprobs)
        except EngineDead:  # not a per-item cause: the request fails, the server exits
            raise
        except Exception as exc:
            return Rating(None, error=_describe(exc))
        masses = {
            int(label): self._label_mass(out.first_token_logprobs, label) for label in self.scale.labels
        }
        total = sum(masses.values())
        if total == 0.0:
            return Rating(
                None,
                error=f"no rating label {self.scale.low}..{self.scale.high} is among the judge's top "
                f"{self.settings.top_logprobs} next tokens (it began with {out.text!r})",
                label_mass=0.0,
            )
        if total < self.settings.min_label_mass:
            return Rating(
                None,
                error=low_mass_error(
                    total, self.settings.min_label_mass, f"the labels {self.scale.low}..{self.scale.high}"
                )
                + f" (it began with {out.text!r})",
                label_mass=total,
            )
        return Rating(sum(v * m for v, m in masses.items()) / total, label_mass=total)

    async def rate_cot(
        self, prompt, response, ctx, *, rubric=None, max_new_tokens=None, max_retries=0, seed=None
    ) -> Rating:
        try:
            messages = templates.pointwise_cot(prompt, response, rubric, self.scale)
            score, text, attempts, why = await self._attempts(
                messages,
                ctx,
                max_new_tokens,
                max_retries,
                seed,
                lambda out: templates.parse_rating(out, self.scale),
            )
        except EngineDead:  # not a per-item cause: the request fails, the server exits
            raise
        except Exception as exc:
            return Rating(None, error=_describe(exc))
        return Rating(score, rationale=text, attempts=attempts, error=why)


KINDS: dict[str, type[Judge]] = {
    "classifier": ClassifierJudge,
    "generative": GenerativeJudge,
    "clip": ClipJudge,
}
RUNNERS = {"classifier": "pooling", "generative": "generate", "clip": "pooling"}


def load_judge(settings: JudgeSettings, cpu_bind: str | None = None) -> Judge:
    """Start the engine for a configured judge (blocking: tens of seconds on a CPU)."""
    bind = settings.engine.cpu_cores or cpu_bind
    engine = Engine.start(settings.model, settings.engine, RUNNERS[settings.kind], cpu_bind=bind)
    try:
        return KINDS[settings.kind](settings, engine)
    except Exception:
        engine.shutdown()
        raise
