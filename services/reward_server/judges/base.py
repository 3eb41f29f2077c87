"""Judges: a configured model and the questions it can answer.

A judge answers one comparison or one rating at a time as a coroutine; callers gather many of
them at once so that they all sit in the engine together and vLLM batches them. Each coroutine
returns its own outcome, errors included, so one failing item never fails or neutralises another.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar, Protocol

from referee.protocol import PairwiseResult, Prompt, content_text, image_parts
from referee.rewards import bradley_terry, circular_pairs, verdict_credit

from .. import templates
from ..cache import cache_key
from ..engine import Completion, Engine, EngineDead
from ..settings import JudgeSettings

_FLIP = {"A": "B", "B": "A", "tie": "tie", "invalid": "invalid"}


class EngineAPI(Protocol):
    """What a judge asks of its engine (``engine.Engine`` on vLLM). Judges depend on this only, so
    the pure logic of a judge kind (parsing, order rules, aggregation) can be unit-tested with a
    scripted engine; serving tests run the real one."""

    model_path: str
    fingerprint: str
    max_model_len: int
    media: list[str]
    tokenizer: Any

    async def tokenize(self, build: Callable[[], Any], priority: float = 0.0) -> Any: ...
    def chat_ids(
        self, messages: list[dict], *, generation_prompt: bool, images: list | None = None
    ) -> list[int]: ...
    def text_ids(self, text: str, add_special_tokens: bool = True, *, data: str = "") -> list[int]: ...
    def plain_ids(self, texts: list[str]) -> list[int]: ...
    def single_token_id(self, label: str) -> int | None: ...
    async def complete(self, token_ids: list[int], **kwargs) -> Completion: ...
    async def classify(self, token_ids: list[int], **kwargs) -> float: ...
    async def embed(self, token_ids: list[int], **kwargs) -> list[float]: ...
    async def classify_all(self, token_ids: list[int], **kwargs) -> list[float]: ...
    async def prompt_logprobs(self, token_ids: list[int], *, start: int, **kwargs) -> tuple[float, int]: ...
    def shutdown(self) -> None: ...


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

    def tokenize_priority(self) -> float:
        """The next prompt's place in the engine's tokeniser queue (lower first; 0 without a ticket)."""
        return 0.0 if self.ticket is None else self.ticket.next_tokenize_priority()

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
    uncertainty: float | None = None  # ensembles: the std of the members' P(first)


@dataclass
class Rating:
    score: float | None
    rationale: str | None = None
    attempts: int = 1
    error: str | None = None
    label_mass: float | None = None  # logprob ratings: the next-token probability on the scale's labels
    logit: float | None = None  # classifiers: the raw reward (score may be its sigmoid)
    objectives: dict[str, float] | None = None  # multi-objective classifiers: every named output
    members: dict[str, float | None] | None = None  # ensembles: each member's raw reward
    uncertainty: float | None = None  # ensembles: the std of the members' raw rewards

    @property
    def reward(self) -> float | None:
        """The raw reward: what Bradley-Terry compares and what shaping transforms (a classifier's
        logit even where its score is a sigmoid; a rating's expected value)."""
        return self.logit if self.logit is not None else self.score


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
    """A judge kind: how it rates one response, how it compares a pair in one order, what a question
    costs in engine requests and which routes it serves. The service runs every kind through the
    same pipeline (validate, admit the cost, ``rate`` / ``judge_pair`` / ``judge_group``); a new kind
    is one subclass registered in ``KINDS``.

    Two families: *pointwise* kinds (classifiers, CLIP, follow-up likelihood, ensembles of them) rate
    each response on its own, a pair's preference is Bradley-Terry on the two raw rewards, and a
    group of N costs N ratings whatever the schedule; *pairwise* kinds (LLM judges) see both
    responses, so order matters and a group costs its schedule's pairs.
    """

    settings: JudgeSettings
    engine: EngineAPI
    label_ids: dict[str, list[int]] = field(default_factory=dict)

    routes: ClassVar[tuple[str, ...]] = ("score", "pairwise", "winrate")
    pairwise_modes: ClassVar[tuple[str, ...]] = ("logprob",)
    pointwise: ClassVar[bool] = True
    schedules: ClassVar[tuple[str, ...]] = ("pairs",)  # how /winrate may schedule a group
    # What the adapters may ask of the kind beyond the native routes (read as data, never by class):
    # "formatted_text": scores text already in the model's own format and whole conversations
    # (vLLM's /classify, OpenRLHF's queries); "chat": free generation (the OpenAI face).
    abilities: ClassVar[frozenset[str]] = frozenset()
    objectives: tuple[str, ...] = ()  # multi-objective reward models: the named outputs

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

    def _fit(self, ids: list[int], generate: bool = False) -> list[int]:
        """``ids`` if they fit the model's context, else ValueError (a per-item error): answered here,
        before the engine's own input processing spends the API process's time on a prompt it
        would refuse anyway."""
        limit = self.engine.max_model_len - (1 if generate else 0)
        if len(ids) > limit:
            kept = " (one token is kept for the answer)" if generate else ""
            raise ValueError(
                f"the judge's input is {len(ids)} tokens, over the model's context length of "
                f"{self.engine.max_model_len} tokens{kept}: shorten the prompt or responses"
            )
        return ids

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

    # ------------------------------------------------------------ what a question costs

    def rating_cost(self) -> int:
        """Engine requests of one rating (before retries)."""
        return 1

    def pair_cost(self, order: str) -> int:
        """Engine requests of one pair under an order option (before retries)."""
        if self.pointwise:
            return 2 * self.rating_cost()
        return 2 if order == "both" else 1

    def schedule(self, n: int, opponents: int | None) -> list[tuple[int, int]]:
        """The pairs of a group of n that are compared. A pointwise kind compares every pair: its N
        ratings give all of them at once."""
        return circular_pairs(n) if self.pointwise else circular_pairs(n, opponents)

    def group_cost(self, n: int, pairs: list[tuple[int, int]], order: str) -> int:
        if self.pointwise:
            return n * self.rating_cost()
        return len(pairs) * self.pair_cost(order)

    # ------------------------------------------------------------ options of a request

    def rating_options(self, req) -> dict:
        """The keyword arguments a request's options give ``rate`` (ValueError: a 400)."""
        return self.objective_options(req)

    def pair_options(self, req) -> dict:
        """The keyword arguments a request's options give ``compare`` (ValueError: a 400)."""
        return self.objective_options(req)

    def objective_options(self, req) -> dict:
        """A request's ``objective`` / ``weights``, checked against the judge's objectives (ValueError:
        the client's mistake, a 400)."""
        objective, weights = getattr(req, "objective", None), getattr(req, "weights", None)
        if objective is None and weights is None:
            return {}
        if not self.objectives:
            raise ValueError(
                f"judge {self.name!r} has no named objectives: `objective` and `weights` are for "
                "multi-objective reward models (see /judges)"
            )
        named = [objective] if objective is not None else list(weights)
        unknown = [n for n in named if n not in self.objectives]
        if unknown:
            raise ValueError(
                f"unknown objective(s) {unknown}; judge {self.name!r} has {list(self.objectives)}"
            )
        return {"objective": objective, "weights": weights}

    def inconsistent_rule(self, req) -> str:
        return getattr(req, "inconsistent", None) or getattr(self.settings, "inconsistent", "tie")

    # ------------------------------------------------------------ questions

    async def rate(self, prompt: Prompt, response, ctx: RequestContext, **opts) -> Rating:
        raise NotImplementedError

    async def compare(self, prompt: Prompt, first, second, ctx: RequestContext, **opts) -> Comparison:
        """One pair in one order, from the perspective of the response shown first. A pointwise kind
        rates both and applies Bradley-Terry to the raw rewards."""
        ra, rb = await asyncio.gather(
            self.rate(prompt, first, ctx, **opts), self.rate(prompt, second, ctx, **opts)
        )
        return self.compare_scores(ra, rb)

    @staticmethod
    def compare_scores(ra: Rating, rb: Rating) -> Comparison:
        """Bradley-Terry on the raw rewards (logits), whatever the activation of the scores."""
        a, b = ra.reward, rb.reward
        if a is None or b is None:
            return Comparison(None, "invalid", error=ra.error or rb.error)
        spreads = [r.uncertainty for r in (ra, rb) if r.uncertainty is not None]
        spread = max(spreads) if spreads else None
        if a == b:
            return Comparison(0.5, "tie", uncertainty=spread)
        return Comparison(bradley_terry(a, b), "A" if a > b else "B", uncertainty=spread)

    async def judge_pair(
        self, prompt: Prompt, a, b, ctx: RequestContext, *, order: str, swap: bool, opts: dict, rule: str
    ) -> PairwiseResult:
        """One pair under an order option; the result is always from A's perspective."""
        if a == b:
            # The same response twice: a tie by definition, whatever the judge (and without it).
            return PairwiseResult(
                index=0, p_a=0.5, verdict="tie", consistent=True if order == "both" else None
            )
        if self.pointwise:  # symmetric: order does not matter
            c = await self.compare(prompt, a, b, ctx, **opts)
            return PairwiseResult(
                index=0, p_a=c.p_first, verdict=c.verdict, uncertainty=c.uncertainty, error=c.error
            )
        if order == "both":
            ab, ba = await asyncio.gather(
                self.compare(prompt, a, b, ctx, **opts), self.compare(prompt, b, a, ctx, **opts)
            )
            return self.combine_orders(ab, ba, opts.get("mode", "logprob"), rule)
        c = await (
            self.compare(prompt, b, a, ctx, **opts) if swap else self.compare(prompt, a, b, ctx, **opts)
        )
        return PairwiseResult(
            index=0,
            p_a=None if c.p_first is None else (1.0 - c.p_first if swap else c.p_first),
            verdict=_FLIP[c.verdict] if swap else c.verdict,
            swapped=swap if order == "random" else None,
            rationales=[c.rationale] if c.rationale is not None else None,
            label_mass=c.label_mass,
            uncertainty=c.uncertainty,
            error=c.error,
        )

    def combine_orders(self, ab: Comparison, ba: Comparison, mode: str, inconsistent: str) -> PairwiseResult:
        """A pair judged in both orders (``ab``: A first, ``ba``: B first) as one result for A."""
        rationales = [r for r in (ab.rationale, ba.rationale) if r is not None] or None
        masses = [c.label_mass for c in (ab, ba) if c.label_mass is not None]
        label_mass = min(masses) if masses else None
        spreads = [c.uncertainty for c in (ab, ba) if c.uncertainty is not None]
        uncertainty = max(spreads) if spreads else None
        if ab.p_first is None or ba.p_first is None:
            errors = [f"{label}: {c.error}" for label, c in (("A first", ab), ("B first", ba)) if c.error]
            return PairwiseResult(
                index=0,
                verdict="invalid",
                rationales=rationales,
                label_mass=label_mass,
                uncertainty=uncertainty,
                error="; ".join(errors),
            )
        # Average the two orders' probabilities for A: position bias cancels to first order.
        p_a = (ab.p_first + (1.0 - ba.p_first)) / 2.0
        margin = getattr(self.settings, "tie_margin", 0.0) if mode == "logprob" else 0.0
        result = PairwiseResult(
            index=0,
            p_a=p_a,
            verdict=verdict_from_probability(p_a, margin),
            consistent=ab.verdict == _FLIP[ba.verdict],
            rationales=rationales,
            label_mass=label_mass,
            uncertainty=uncertainty,
        )
        if result.consistent:
            return result
        # The verdict flips with the order: the judge preferred a position, not a response, and the
        # averaged probability (e.g. P(A) 0.99 in both orders -> 0.5 + noise) only hides that. MT-Bench
        # (Zheng et al. 2023, "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena", sec. 3.4)
        # declares a win only when a response is preferred in both orders and calls an inconsistent
        # pair a tie; JudgeLM (Zhu et al. 2023, arXiv:2310.17631) measures the same swap consistency.
        result.inconsistent_rule = inconsistent
        if inconsistent == "tie":
            result.p_a, result.verdict = 0.5, "tie"
        elif inconsistent == "drop":
            result.p_a, result.verdict = None, "invalid"
            result.error = (
                f"the verdict changed with the order (A first: {ab.verdict}, B first: "
                f"{_FLIP[ba.verdict]} for A; averaged P(A) {p_a:.3f}), dropped by inconsistent=drop"
            )
        return result

    async def judge_group(
        self,
        prompt: Prompt,
        responses: list,
        pairs: list[tuple[int, int]],
        ctx: RequestContext,
        *,
        order: str,
        swaps: list[bool],
        opts: dict,
        rule: str,
    ) -> tuple[list[PairwiseResult], list[Rating] | None]:
        """Every scheduled pair of a group (all sent to the engine at once, so vLLM batches them and
        they share the question's cached prefix), and each response's rating where the kind rates."""
        if self.pointwise:
            # N ratings give every pair; identical responses are rated once.
            first = [next(i for i in range(k + 1) if responses[i] == r) for k, r in enumerate(responses)]
            distinct = sorted(set(first))
            rated = await asyncio.gather(*[self.rate(prompt, responses[i], ctx, **opts) for i in distinct])
            by_index = dict(zip(distinct, rated, strict=True))
            ratings = [by_index[first[k]] for k in range(len(responses))]
            results = []
            for i, j in pairs:
                c = self.compare_scores(ratings[i], ratings[j])
                results.append(
                    PairwiseResult(
                        index=0, p_a=c.p_first, verdict=c.verdict, uncertainty=c.uncertainty, error=c.error
                    )
                )
            return results, ratings
        results = await asyncio.gather(
            *[
                self.judge_pair(
                    prompt, responses[i], responses[j], ctx, order=order, swap=s, opts=opts, rule=rule
                )
                for (i, j), s in zip(pairs, swaps, strict=True)
            ]
        )
        return list(results), None


class ClassifierJudge(Judge):
    """A sequence-classification reward model: one raw logit per (prompt, response). Pairwise
    questions are Bradley-Terry on the two scores; no generation involved.

    A multi-objective reward model (several named outputs, as ArmoRM's nineteen objectives or the
    HelpSteer attributes; Wang et al. 2024, "Interpretable Preferences via Multi-Objective Reward
    Modeling and Mixture-of-Experts"; Directional Preference Alignment, Wang et al. 2024) returns
    every objective, and its reward is their weighted sum: the judge's ``weights`` (default: equal),
    a request's ``weights``, or one ``objective`` alone."""

    def __post_init__(self) -> None:
        self.engine.prompts  # noqa: B018 -- fails at start-up where user text cannot be kept out of control
        labels = getattr(self.engine, "output_labels", None) or []
        self.objectives = tuple(labels) if len(labels) > 1 else ()
        weights = self.settings.weights
        if weights and not self.objectives:
            raise JudgeConfigError(
                f"judge {self.name!r}: `weights` are for multi-objective reward models, and "
                f"{self.settings.model} has {len(labels) or 1} unnamed output(s)"
            )
        if weights:
            unknown = sorted(set(weights) - set(self.objectives))
            if unknown:
                raise JudgeConfigError(
                    f"judge {self.name!r}: weights name unknown objectives {unknown}; the model's "
                    f"objectives are {list(self.objectives)}"
                )
        self.weights = weights or {name: 1.0 / len(self.objectives) for name in self.objectives}

    abilities: ClassVar[frozenset[str]] = frozenset({"formatted_text"})

    def combine(
        self, values: dict[str, float], objective: str | None, weights: dict[str, float] | None
    ) -> float:
        if objective is not None:
            return values[objective]
        return sum(w * values[name] for name, w in (weights or self.weights).items())

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

    async def rate(self, prompt: Prompt, response: str, ctx: RequestContext, **opts) -> Rating:
        return await self._classify(lambda: self._input_ids(prompt, response), ctx, None, **opts)

    async def _classify(
        self,
        build_ids,
        ctx: RequestContext,
        activation: bool | None,
        objective: str | None = None,
        weights: dict[str, float] | None = None,
    ) -> Rating:
        """One forward pass gives both: the raw logit (what Bradley-Terry compares) and the score the
        caller asked for (the logit, or its sigmoid: vLLM's activation of a one-label classifier).
        A multi-objective model's raw reward is the weighted sum of its objectives (or one of them)."""
        if activation is None:
            activation = self.settings.activation == "sigmoid"
        objectives = None
        try:
            ids = self._fit(await self.engine.tokenize(build_ids, ctx.tokenize_priority()))
            several = bool(self.objectives)

            async def run():
                ctx.engine_requests += 1
                ctx.prompt_tokens += len(ids)
                try:
                    if several:
                        return await self.engine.classify_all(ids, **ctx.engine_args())
                    return await self.engine.classify(ids, activation=False, **ctx.engine_args())
                finally:
                    ctx.engine_done()

            kind = "classify_all" if several else "classify"
            out = await self._cached(ctx, self._cache_key(ctx, kind, ids, [], None), run)
            if several:
                if len(out) != len(self.objectives):
                    raise ValueError(
                        f"the classifier returned {len(out)} outputs for {len(self.objectives)} objectives"
                    )
                objectives = dict(zip(self.objectives, out, strict=True))
                logit = self.combine(objectives, objective, weights)
            else:
                logit = out
        except EngineDead:  # not a per-item cause: the request fails, the server exits
            raise
        except Exception as exc:
            return Rating(None, error=_describe(exc))
        if not math.isfinite(logit) or (objectives and not all(map(math.isfinite, objectives.values()))):
            return Rating(
                None, objectives=objectives, error=f"the classifier returned a non-finite score ({logit})"
            )
        return Rating(bradley_terry(logit, 0.0) if activation else logit, logit=logit, objectives=objectives)


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
    pointwise = False
    schedules = ("pairs", "listwise")
    abilities = frozenset({"chat"})

    def rating_options(self, req) -> dict:
        self.objective_options(req)
        return {"rubric": req.rubric}

    def pair_options(self, req) -> dict:
        self.objective_options(req)
        return dict(
            mode=req.mode,
            rubric=req.rubric,
            max_new_tokens=req.max_new_tokens,
            max_retries=req.max_retries,
            seed=req.seed,
        )

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

    async def _generate(self, build: Callable[[], list[dict]], ctx: RequestContext, **kwargs):
        """One generation for the judge prompt ``build()`` makes. The prompt is built (templated,
        every text defused) and tokenised in the engine's tokeniser thread, never in the event loop:
        a group's thousands of prompts would otherwise block it for their whole length."""
        images: list = []
        ids = await self.engine.tokenize(
            lambda: self.engine.chat_ids(build(), generation_prompt=True, images=images),
            ctx.tokenize_priority(),
        )
        self._fit(ids, generate=True)

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
        out = await self._generate(
            lambda: templates.pairwise_logprob(prompt, first, second, rubric),
            ctx,
            max_tokens=1,
            top_logprobs=self.settings.top_logprobs,
        )
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

    async def _attempts(self, build, ctx, max_new_tokens, max_retries, seed, parse):
        """Reason-then-answer with bounded retries; the first attempt is greedy unless configured."""
        budget = max_new_tokens or self.settings.cot_max_new_tokens
        text, why = "", ""
        for attempt in range(max_retries + 1):
            temperature = self.settings.cot_temperature if attempt == 0 else 0.7
            out = await self._generate(
                build,
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
            messages = partial(templates.pairwise_answer_tag, prompt, first, second, rubric)
            parse = templates.parse_answer_tag
        else:
            messages = partial(templates.pairwise_cot, prompt, first, second, rubric)
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
            out = await self._generate(
                lambda: templates.pointwise_logprob(prompt, response, rubric, self.scale),
                ctx,
                max_tokens=1,
                top_logprobs=self.settings.top_logprobs,
            )
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

    def list_cost(self, order: str) -> int:
        """Engine requests of one listwise ranking of a group (before retries)."""
        return 2 if order == "both" else 1

    async def judge_list(
        self,
        prompt: Prompt,
        responses: list,
        ctx: RequestContext,
        *,
        order: str,
        seed: int | None,
        opts: dict,
        rule: str,
    ) -> tuple[list[PairwiseResult], list[list[int] | None]]:
        """A whole group ranked in one generation (per order), read as every pair's verdict.

        order=both shows the group forward and reversed: a pair ranked one way in one listing and
        the other way in the other is inconsistent, and ``rule`` decides it as for pairs (average
        of a win and a loss is a tie). A ranking that is not a strict permutation of the group is
        invalid (retried up to max_retries), never guessed at."""
        n = len(responses)
        shown_orders = [list(range(n))]
        if order == "both":
            shown_orders.append(list(reversed(range(n))))
        elif order == "random":
            random.Random(seed).shuffle(shown_orders[0])

        async def rank(shown: list[int]):
            messages = partial(
                templates.listwise_cot, prompt, [responses[i] for i in shown], opts.get("rubric")
            )
            try:
                ranking, _, _, why = await self._attempts(
                    messages,
                    ctx,
                    opts.get("max_new_tokens"),
                    opts.get("max_retries", 0),
                    seed,
                    lambda out: templates.parse_ranking(out, n),
                )
            except EngineDead:
                raise
            except Exception as exc:
                return None, _describe(exc)
            return (None, why) if ranking is None else ([shown[p] for p in ranking], "")

        ranked = await asyncio.gather(*[rank(shown) for shown in shown_orders])
        rankings = [r for r, _ in ranked]
        why = "; ".join(f"listing {k + 1}: {w}" for k, (r, w) in enumerate(ranked) if r is None)
        place = [None if r is None else {resp: pos for pos, resp in enumerate(r)} for r in rankings]
        results = []
        for i, j in circular_pairs(n):
            if responses[i] == responses[j]:
                results.append(PairwiseResult(index=0, p_a=0.5, verdict="tie"))
                continue
            if why:
                results.append(PairwiseResult(index=0, verdict="invalid", error=why))
                continue
            credits = [1.0 if p[i] < p[j] else 0.0 for p in place]
            result = PairwiseResult(index=0, p_a=credits[0], verdict="A" if credits[0] else "B")
            if len(credits) == 2:
                result.consistent = credits[0] == credits[1]
                if not result.consistent:
                    result.inconsistent_rule = rule
                    if rule == "drop":
                        result.p_a, result.verdict = None, "invalid"
                        result.error = "ranked differently in the two listings, dropped by inconsistent=drop"
                    else:  # tie, or the average of a win and a loss
                        result.p_a, result.verdict = 0.5, "tie"
            results.append(result)
        return results, rankings

    async def rate_cot(
        self, prompt, response, ctx, *, rubric=None, max_new_tokens=None, max_retries=0, seed=None
    ) -> Rating:
        try:
            messages = partial(templates.pointwise_cot, prompt, response, rubric, self.scale)
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


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class FollowupJudge(Judge):
    """Follow-up likelihood as reward (Zhang et al. 2024, "Aligning Language Models Using Follow-up
    Likelihood as Reward Signal", arXiv:2409.13948): after the conversation and the response, how
    likely the judge model finds a satisfied next message from the user against a dissatisfied one.
    The reward is the mean per-token log-probability of the positive follow-ups minus that of the
    negative ones, read from vLLM's prompt log-probabilities (one prefill per follow-up, no
    generation). Pointwise: a group of N costs N x (follow-ups) engine requests, and it runs on any
    instruction-tuned model, sharing the engine of a generative judge on the same model."""

    def __post_init__(self) -> None:
        if not self.engine.tokenizer.chat_template:
            raise JudgeConfigError(
                f"judge {self.name!r}: the model {self.settings.model} has no chat template; a followup "
                "judge must be an instruction-tuned chat model"
            )
        if not self.settings.followups_positive or not self.settings.followups_negative:
            raise JudgeConfigError(
                f"judge {self.name!r}: give at least one positive and one negative follow-up"
            )

    @property
    def media(self) -> list[str]:
        return []  # the follow-ups are scored on text; images are not passed to the engine

    def rating_cost(self) -> int:
        return len(self.settings.followups_positive) + len(self.settings.followups_negative)

    def _span(self, messages: list[dict], followup: str) -> tuple[list[int], int]:
        """The conversation with the follow-up as the user's next message, cut after the follow-up's
        own tokens, and where they start (the template's turn markers around it are not scored)."""
        full = self.engine.chat_ids(
            [*messages, {"role": "user", "content": followup}], generation_prompt=False
        )
        empty = self.engine.chat_ids([*messages, {"role": "user", "content": ""}], generation_prompt=False)
        start = _common_prefix(full, empty)
        end = start + len(full) - len(empty)
        if end <= start or start < 1:
            raise ValueError(f"the follow-up {followup!r} has no tokens of its own in this chat template")
        return full[:end], start

    async def _followup(self, ids: list[int], start: int, ctx: RequestContext) -> float:
        async def run() -> float:
            ctx.engine_requests += 1
            ctx.prompt_tokens += len(ids)
            try:
                total, count = await self.engine.prompt_logprobs(ids, start=start, **ctx.engine_args())
            finally:
                ctx.engine_done()
            return total / count

        return await self._cached(ctx, self._cache_key(ctx, "followup", ids, [], start), run)

    async def rate(self, prompt: Prompt, response, ctx: RequestContext, **_) -> Rating:
        try:
            messages = (
                [{"role": "user", "content": prompt}]
                if isinstance(prompt, str)
                else [m.model_dump() for m in prompt]
            )
            messages.append({"role": "assistant", "content": response})
            positive, negative = self.settings.followups_positive, self.settings.followups_negative
            spans = await self.engine.tokenize(
                lambda: [self._span(messages, f) for f in [*positive, *negative]],
                ctx.tokenize_priority(),
            )
            values = await asyncio.gather(
                *[self._followup(self._fit(ids), start, ctx) for ids, start in spans]
            )
        except EngineDead:  # not a per-item cause: the request fails, the server exits
            raise
        except Exception as exc:
            return Rating(None, error=_describe(exc))
        pos, neg = values[: len(positive)], values[len(positive) :]
        score = sum(pos) / len(pos) - sum(neg) / len(neg)
        return Rating(score, logit=score)

    def validate(self, where: str, prompt: Prompt, response) -> None:
        if image_parts(response) or (
            not isinstance(prompt, str) and any(image_parts(m.content) for m in prompt)
        ):
            raise ValueError(f"{where}: a followup judge scores text only; send text")


def _spread(values: list[float]) -> float:
    """Population standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def aggregate_rewards(values: list[float], how: str, penalty: float) -> float:
    """Combine member rewards (Coste et al. 2024, "Reward Model Ensembles Help Mitigate
    Overoptimization", ICLR): mean; worst-case optimisation (the minimum); uncertainty-weighted
    optimisation (mean - penalty x std)."""
    mean = sum(values) / len(values)
    if how == "worst":
        return min(values)
    if how == "uncertainty":
        return mean - penalty * _spread(values)
    return mean


def aggregate_preferences(ps: list[float], how: str, penalty: float) -> float:
    """Combine member probabilities that the first response is better. mean: their mean; worst: the
    member least sure of the mean's winner, and 1/2 (a tie) as soon as one member prefers the other
    response; uncertainty: the mean's distance from 1/2 shrunk by penalty x std (never past 1/2), the
    pairwise counterpart of mean - lambda x std."""
    mean = sum(ps) / len(ps)
    if how == "worst":
        return max(0.5, min(ps)) if mean >= 0.5 else min(0.5, max(ps))
    if how == "uncertainty":
        shrunk = max(0.0, abs(mean - 0.5) - penalty * _spread(ps))
        return 0.5 + math.copysign(shrunk, mean - 0.5)
    return mean


class EnsembleJudge(Judge):
    """Several judges of the server as one: every member answers each question (all at once, so each
    member's engine batches its share) and the answers combine by ``aggregate``; every result
    reports the members' disagreement. A member failing on an item makes the ensemble's answer for
    that item invalid, naming the member: a missing opinion is not averaged away."""

    def __init__(self, settings: JudgeSettings, members: list[Judge]) -> None:
        super().__init__(settings, engine=None)  # type: ignore[arg-type] -- no engine of its own
        self.members = members

    @property
    def pointwise(self) -> bool:  # type: ignore[override]
        return all(m.pointwise for m in self.members)

    @property
    def routes(self) -> tuple[str, ...]:  # type: ignore[override]
        shared = set.intersection(*(set(m.routes) for m in self.members)) - {"judge"}
        return tuple(r for r in ("score", "pairwise", "winrate") if r in shared)

    @property
    def pairwise_modes(self) -> tuple[str, ...]:  # type: ignore[override]
        pairwise = [set(m.pairwise_modes) for m in self.members if not m.pointwise]
        if not pairwise:
            return ("logprob",)
        shared = set.intersection(*pairwise)
        return tuple(m for m in ("logprob", "cot") if m in shared)

    @property
    def media(self) -> list[str]:
        return sorted(set.intersection(*(set(m.media) for m in self.members)))

    def validate(self, where: str, prompt: Prompt, response) -> None:
        for m in self.members:
            m.validate(where, prompt, response)

    def rating_cost(self) -> int:
        return sum(m.rating_cost() for m in self.members)

    def pair_cost(self, order: str) -> int:
        if self.pointwise:
            return 2 * self.rating_cost()
        return sum(m.pair_cost(order) for m in self.members)

    def rating_options(self, req) -> dict:
        return {"members": {m.name: m.rating_options(req) for m in self.members}}

    def pair_options(self, req) -> dict:
        return {"mode": req.mode, "members": {m.name: m.pair_options(req) for m in self.members}}

    def shutdown(self) -> None:
        """The members are judges of the server in their own right: they shut down themselves."""

    async def rate(self, prompt: Prompt, response, ctx: RequestContext, **opts) -> Rating:
        each = opts.get("members", {})
        ratings = await asyncio.gather(
            *[m.rate(prompt, response, ctx, **each.get(m.name, {})) for m in self.members]
        )
        rewards = {m.name: r.reward for m, r in zip(self.members, ratings, strict=True)}
        failed = [
            f"{m.name}: {r.error or 'no reward'}"
            for m, r in zip(self.members, ratings, strict=True)
            if r.reward is None
        ]
        if failed:
            return Rating(None, members=rewards, error="ensemble member failed: " + "; ".join(failed))
        values = list(rewards.values())
        value = aggregate_rewards(values, self.settings.aggregate, self.settings.uncertainty_penalty)
        return Rating(value, logit=value, members=rewards, uncertainty=_spread(values))

    async def compare(self, prompt: Prompt, first, second, ctx: RequestContext, **opts) -> Comparison:
        if self.pointwise:
            return await super().compare(prompt, first, second, ctx, **opts)
        each = opts.get("members", {})
        comparisons = await asyncio.gather(
            *[m.compare(prompt, first, second, ctx, **each.get(m.name, {})) for m in self.members]
        )
        failed = [
            f"{m.name}: {c.error or 'invalid verdict'}"
            for m, c in zip(self.members, comparisons, strict=True)
            if c.p_first is None
        ]
        masses = [c.label_mass for c in comparisons if c.label_mass is not None]
        mass = min(masses) if masses else None
        if failed:
            return Comparison(
                None,
                "invalid",
                error="ensemble member failed: " + "; ".join(failed),
                label_mass=mass,
                low_label_mass=any(c.low_label_mass for c in comparisons),
            )
        ps = [c.p_first for c in comparisons]
        p = aggregate_preferences(ps, self.settings.aggregate, self.settings.uncertainty_penalty)
        margin = self.settings.tie_margin if opts.get("mode", "logprob") == "logprob" else 0.0
        rationales = [
            f"[{m.name}] {c.rationale}" for m, c in zip(self.members, comparisons, strict=True) if c.rationale
        ]
        return Comparison(
            p,
            verdict_from_probability(p, margin),
            rationale="\n\n".join(rationales) or None,
            label_mass=mass,
            uncertainty=_spread(ps),
        )


KINDS: dict[str, type[Judge]] = {
    "classifier": ClassifierJudge,
    "generative": GenerativeJudge,
    "clip": ClipJudge,
    "ensemble": EnsembleJudge,
    "followup": FollowupJudge,
}
RUNNERS = {"classifier": "pooling", "generative": "generate", "clip": "pooling", "followup": "generate"}


def engine_key(settings: JudgeSettings) -> tuple | None:
    """Judges with the same key share one engine (one copy of the model in memory): the same model,
    runner and engine settings, e.g. a generative judge and a follow-up judge on the same LLM.
    None for a kind without an engine of its own (an ensemble)."""
    if settings.kind not in RUNNERS:
        return None
    return (settings.model, RUNNERS[settings.kind], settings.engine.model_dump_json())


def load_judge(
    settings: JudgeSettings, cpu_bind: str | None = None, loaded: dict[str, Judge] | None = None
) -> Judge:
    """Start the engine for a configured judge (blocking: tens of seconds on a CPU), or reuse the
    engine of a judge in ``loaded`` with the same ``engine_key``. An ensemble starts none: it is
    made of the judges in ``loaded`` that it names."""
    loaded = loaded or {}
    if settings.kind == "ensemble":
        return EnsembleJudge(settings, [loaded[name] for name in settings.members])
    key = engine_key(settings)
    shared = next((j.engine for j in loaded.values() if engine_key(j.settings) == key), None)
    if shared is not None:
        return KINDS[settings.kind](settings, shared)
    bind = settings.engine.cpu_cores or cpu_bind
    engine = Engine.start(settings.model, settings.engine, RUNNERS[settings.kind], cpu_bind=bind)
    try:
        return KINDS[settings.kind](settings, engine)
    except Exception:
        engine.shutdown()
        raise
