"""What every judge kind shares: the engine protocol, a request's context, the outcomes of one
comparison and one rating, and ``Judge``, the base class of the kinds (one module each in this
package, registered in ``registry``).

A judge answers one comparison or one rating at a time as a coroutine; callers gather many of
them at once so that they all sit in the engine together and vLLM batches them. Each coroutine
returns its own outcome, errors included, so one failing item never fails or neutralises another.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from referee.protocol import PairwiseResult, Prompt
from referee.rewards import bradley_terry, circular_pairs

from ..cache import cache_key
from ..engine_types import Completion
from ..judge_settings import JudgeSettings

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
    uncertainty: float | None = None  # ensembles: the std of the members' P(first); samples: of their credits
    votes: dict[str, int] | None = None  # samples > 1: the sampled verdicts, from the first's side


def flip_votes(votes: dict[str, int] | None) -> dict[str, int] | None:
    """Sampled verdicts from the other response's side."""
    if votes is None:
        return None
    return {_FLIP.get(k, k): n for k, n in votes.items()}


def add_votes(*counts: dict[str, int] | None) -> dict[str, int] | None:
    present = [c for c in counts if c]
    if not present:
        return None
    total: dict[str, int] = {}
    for c in present:
        for k, n in c.items():
            total[k] = total.get(k, 0) + n
    return total


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
    uncertainty: float | None = (
        None  # ensembles: the std of the members' raw rewards; samples: of the ratings
    )
    votes: dict[str, int] | None = None  # samples > 1: how many samples gave each rating (and invalid)
    step_scores: list[float] | None = None  # process reward models: each step's score
    step_spans: list[tuple[int, int]] | None = None  # ... and its character span in the response

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


@dataclass(frozen=True)
class Capabilities:
    """What a configured judge can be asked, known from its settings without loading it: the
    routes it serves, its pairwise modes, how /winrate may schedule a group, whether it rates
    responses on their own, and what the adapters may ask of it (``Judge.abilities``)."""

    routes: tuple[str, ...]
    pairwise_modes: tuple[str, ...]
    schedules: tuple[str, ...]
    pointwise: bool
    abilities: frozenset[str]


@dataclass
class Judge:
    """A judge kind: how it rates one response, how it compares a pair in one order, what a question
    costs in engine requests and which routes it serves. The service runs every kind through the
    same pipeline (validate, admit the cost, ``rate`` / ``judge_pair`` / ``judge_group``); a new kind
    is one module (its ``Judge`` subclass and its ``JudgeSettings`` subclass) and one line in
    ``registry.REGISTRY``.

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
    runner: ClassVar[str | None] = None  # its engine's vLLM runner; None: no engine of its own
    objectives: tuple[str, ...] = ()  # multi-objective reward models: the named outputs

    @classmethod
    def kind_capabilities(cls, members: Sequence[Capabilities] = ()) -> Capabilities:
        """The kind's class data; a kind made of other judges (an ensemble) derives its own from
        its ``members``' (see ``registry.capabilities``, which needs no engine)."""
        return Capabilities(cls.routes, cls.pairwise_modes, cls.schedules, cls.pointwise, cls.abilities)

    @property
    def capabilities(self) -> Capabilities:
        return self.kind_capabilities()

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
            votes=flip_votes(c.votes) if swap else c.votes,
            error=c.error,
        )

    def combine_orders(self, ab: Comparison, ba: Comparison, mode: str, inconsistent: str) -> PairwiseResult:
        """A pair judged in both orders (``ab``: A first, ``ba``: B first) as one result for A."""
        rationales = [r for r in (ab.rationale, ba.rationale) if r is not None] or None
        masses = [c.label_mass for c in (ab, ba) if c.label_mass is not None]
        label_mass = min(masses) if masses else None
        spreads = [c.uncertainty for c in (ab, ba) if c.uncertainty is not None]
        uncertainty = max(spreads) if spreads else None
        votes = add_votes(ab.votes, flip_votes(ba.votes))
        if ab.p_first is None or ba.p_first is None:
            errors = [f"{label}: {c.error}" for label, c in (("A first", ab), ("B first", ba)) if c.error]
            return PairwiseResult(
                index=0,
                verdict="invalid",
                rationales=rationales,
                label_mass=label_mass,
                uncertainty=uncertainty,
                votes=votes,
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
            votes=votes,
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
