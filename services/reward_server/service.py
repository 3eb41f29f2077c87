"""The judge service: one fixed pipeline per question, shared by the HTTP routes and the queue.

validate (judge, mode, limits) -> admit (bound what is in flight) -> submit every engine request of
the question at once -> collect -> build the protocol response. Client mistakes raise
``ClientError`` with the HTTP status and a message that says what to change.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterable
from contextlib import contextmanager

from referee.protocol import (
    JudgeInfo,
    JudgeRequest,
    JudgeResponse,
    JudgeResult,
    JudgesResponse,
    PairwiseRequest,
    PairwiseResponse,
    PairwiseResult,
    ScoreRequest,
    ScoreResponse,
    ScoreResult,
    Usage,
    WinRateRequest,
    WinRateResponse,
)
from referee.rewards import circular_pairs, group_advantages, verdict_credit, win_rates

from . import metrics
from .judges import (
    ClassifierJudge,
    Comparison,
    GenerativeJudge,
    Judge,
    RequestContext,
    load_judge,
    verdict_from_probability,
)
from .settings import ServerSettings

logger = logging.getLogger(__name__)

_FLIP = {"A": "B", "B": "A", "tie": "tie", "invalid": "invalid"}


class ClientError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def _usage(ctx: RequestContext) -> Usage:
    return Usage(
        prompt_tokens=ctx.prompt_tokens,
        completion_tokens=ctx.completion_tokens,
        engine_requests=ctx.engine_requests,
    )


class JudgeService:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.judges: dict[str, Judge] = {}
        self.load_error: str | None = None
        self._inflight = 0

    # ------------------------------------------------------------ lifecycle

    @property
    def ready(self) -> bool:
        return len(self.judges) == len(self.settings.judges)

    async def load(self) -> None:
        """Start every configured engine (in a thread: engine start-up blocks for tens of seconds)."""
        try:
            for cfg in self.settings.judges:
                judge = await asyncio.to_thread(load_judge, cfg)
                self.judges[cfg.name] = judge
                logger.info("judge %r (%s, %s) is ready", cfg.name, cfg.kind, judge.engine.model_path)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.exception("loading the judges failed")
            raise

    def shutdown(self) -> None:
        for judge in self.judges.values():
            judge.shutdown()
        self.judges.clear()

    # ------------------------------------------------------------ validation

    def judge_for(self, name: str | None, route: str) -> Judge:
        if not self.ready:
            raise ClientError(
                503,
                "loading",
                self.load_error or "the judges are still loading; retry shortly",
                {"Retry-After": "5"},
            )
        name = name or self.settings.default_judge
        judge = self.judges.get(name)
        if judge is None:
            raise ClientError(404, "unknown_judge", f"no judge named {name!r}; loaded: {sorted(self.judges)}")
        if route not in judge.routes:
            raise ClientError(
                400,
                "unsupported",
                f"judge {name!r} is a {judge.kind} judge and cannot answer {route}; "
                f"it answers {', '.join(judge.routes)}",
            )
        return judge

    def _check_mode(self, judge: Judge, mode: str) -> None:
        if mode not in judge.pairwise_modes:
            raise ClientError(
                400,
                "unsupported",
                f"judge {judge.name!r} ({judge.kind}) cannot judge with mode={mode!r}; "
                f"use one of {list(judge.pairwise_modes)} or a generative judge",
            )

    def check_items(self, n: int) -> None:
        if n > self.limits.max_items:
            raise ClientError(
                413,
                "too_large",
                f"{n} items exceed the limit of {self.limits.max_items} per request "
                "(limits.max_items); split the request",
            )

    def check_texts(self, texts: Iterable[tuple[str, str]]) -> None:
        limit = self.limits.max_text_chars
        for where, text in texts:
            if len(text) > limit:
                raise ClientError(
                    413,
                    "too_large",
                    f"{where} has {len(text)} characters, over the limit of {limit} "
                    "(limits.max_text_chars); shorten it",
                )

    def _check_generation(self, max_new_tokens: int | None, max_retries: int) -> None:
        if max_new_tokens is not None and max_new_tokens > self.limits.max_new_tokens:
            raise ClientError(
                413,
                "too_large",
                f"max_new_tokens={max_new_tokens} is over the limit of "
                f"{self.limits.max_new_tokens} (limits.max_new_tokens)",
            )
        if max_retries > self.limits.max_retries:
            raise ClientError(
                400,
                "bad_request",
                f"max_retries={max_retries} is over the limit of {self.limits.max_retries}",
            )

    @staticmethod
    def _prompt_texts(where: str, prompt) -> list[tuple[str, str]]:
        if isinstance(prompt, str):
            return [(where, prompt)]
        return [(f"{where}[{k}].content", m.content) for k, m in enumerate(prompt)]

    @contextmanager
    def admit(self, engine_requests: int):
        """Bound the engine requests in flight; past the bound the caller gets 429 + Retry-After."""
        limit = self.limits.max_inflight
        if engine_requests > limit:
            raise ClientError(
                413,
                "too_large",
                f"this request needs {engine_requests} engine requests, over the "
                f"in-flight limit of {limit} (limits.max_inflight); split it",
            )
        if self._inflight + engine_requests > limit:
            raise ClientError(
                429,
                "overloaded",
                f"the judge has {self._inflight} requests in flight (limit {limit}); "
                "retry after the delay in Retry-After",
                {"Retry-After": "1"},
            )
        self._inflight += engine_requests
        metrics.INFLIGHT.set(self._inflight)
        try:
            yield
        finally:
            self._inflight -= engine_requests
            metrics.INFLIGHT.set(self._inflight)

    # ------------------------------------------------------------ questions

    async def score(self, req: ScoreRequest, priority: int = 0) -> ScoreResponse:
        judge = self.judge_for(req.judge, "score")
        self.check_items(len(req.items))
        self.check_texts(
            t
            for k, it in enumerate(req.items)
            for t in [
                *self._prompt_texts(f"items[{k}].prompt", it.prompt),
                (f"items[{k}].response", it.response),
            ]
        )
        ctx = RequestContext(priority=priority)
        with self.admit(len(req.items)):
            if isinstance(judge, GenerativeJudge):
                coros = [judge.rate(it.prompt, it.response, ctx, rubric=req.rubric) for it in req.items]
            else:
                coros = [judge.rate(it.prompt, it.response, ctx) for it in req.items]
            ratings = await asyncio.gather(*coros)
        results = [ScoreResult(index=k, score=r.score, error=r.error) for k, r in enumerate(ratings)]
        metrics.record_items("score", judge.name, len(results), sum(r.error is not None for r in results))
        metrics.record_tokens(judge.name, ctx)
        return ScoreResponse(judge=judge.name, results=results, usage=_usage(ctx))

    def _requests_per_pair(self, judge: Judge, order: str) -> int:
        if isinstance(judge, ClassifierJudge):
            return 2
        return 2 if order == "both" else 1

    async def _pair(
        self, judge: Judge, prompt, a: str, b: str, order: str, swap: bool, ctx: RequestContext, opts: dict
    ):
        """Judge one pair under an order option; the result is always from A's perspective."""
        if isinstance(judge, ClassifierJudge):  # symmetric: order does not matter
            c = await judge.compare(prompt, a, b, ctx)
            return PairwiseResult(index=0, p_a=c.p_first, verdict=c.verdict, error=c.error)
        if order == "both":
            ab, ba = await asyncio.gather(
                judge.compare(prompt, a, b, ctx, **opts), judge.compare(prompt, b, a, ctx, **opts)
            )
            return self._combine(judge, ab, ba, opts["mode"])
        c = await (
            judge.compare(prompt, b, a, ctx, **opts) if swap else judge.compare(prompt, a, b, ctx, **opts)
        )
        p_a = None if c.p_first is None else (1.0 - c.p_first if swap else c.p_first)
        verdict = _FLIP[c.verdict] if swap else c.verdict
        return PairwiseResult(
            index=0,
            p_a=p_a,
            verdict=verdict,
            swapped=swap if order == "random" else None,
            rationales=[c.rationale] if c.rationale is not None else None,
            error=c.error,
        )

    @staticmethod
    def _combine(judge: GenerativeJudge, ab: Comparison, ba: Comparison, mode: str) -> PairwiseResult:
        rationales = [r for r in (ab.rationale, ba.rationale) if r is not None] or None
        if ab.p_first is None or ba.p_first is None:
            errors = [f"{label}: {c.error}" for label, c in (("A first", ab), ("B first", ba)) if c.error]
            return PairwiseResult(index=0, verdict="invalid", rationales=rationales, error="; ".join(errors))
        # Average the two orders' probabilities for A: position bias cancels to first order.
        p_a = (ab.p_first + (1.0 - ba.p_first)) / 2.0
        margin = judge.settings.tie_margin if mode == "logprob" else 0.0
        return PairwiseResult(
            index=0,
            p_a=p_a,
            verdict=verdict_from_probability(p_a, margin),
            consistent=ab.verdict == _FLIP[ba.verdict],
            rationales=rationales,
        )

    def _pair_opts(self, judge: Judge, req) -> dict:
        if isinstance(judge, ClassifierJudge):
            return {}
        return dict(
            mode=req.mode,
            rubric=req.rubric,
            max_new_tokens=req.max_new_tokens,
            max_retries=req.max_retries,
            seed=req.seed,
        )

    async def pairwise(self, req: PairwiseRequest, priority: int = 0) -> PairwiseResponse:
        judge = self.judge_for(req.judge, "pairwise")
        self._check_mode(judge, req.mode)
        self.check_items(len(req.items))
        self._check_generation(req.max_new_tokens, req.max_retries)
        self.check_texts(
            t
            for k, it in enumerate(req.items)
            for t in [
                *self._prompt_texts(f"items[{k}].prompt", it.prompt),
                (f"items[{k}].response_a", it.response_a),
                (f"items[{k}].response_b", it.response_b),
            ]
        )
        rng = random.Random(req.seed)
        swaps = [req.order == "random" and rng.random() < 0.5 for _ in req.items]
        opts = self._pair_opts(judge, req)
        ctx = RequestContext(priority=priority)
        with self.admit(len(req.items) * self._requests_per_pair(judge, req.order)):
            results = await asyncio.gather(
                *[
                    self._pair(judge, it.prompt, it.response_a, it.response_b, req.order, swap, ctx, opts)
                    for it, swap in zip(req.items, swaps, strict=True)
                ]
            )
        for k, r in enumerate(results):
            r.index = k
        metrics.record_items(
            "pairwise", judge.name, len(results), sum(r.verdict == "invalid" for r in results)
        )
        metrics.record_verdicts(judge.name, (r.verdict for r in results))
        metrics.record_tokens(judge.name, ctx)
        return PairwiseResponse(judge=judge.name, results=results, usage=_usage(ctx))

    async def judge(self, req: JudgeRequest, priority: int = 0) -> JudgeResponse:
        judge = self.judge_for(req.judge, "judge")
        assert isinstance(judge, GenerativeJudge)
        self.check_items(len(req.items))
        self._check_generation(req.max_new_tokens, req.max_retries)
        texts = []
        for k, it in enumerate(req.items):
            texts += self._prompt_texts(f"items[{k}].prompt", it.prompt)
            texts += [
                (f"items[{k}].{f}", getattr(it, f))
                for f in ("response", "response_a", "response_b")
                if getattr(it, f) is not None
            ]
        self.check_texts(texts)
        gen = dict(max_new_tokens=req.max_new_tokens, max_retries=req.max_retries, seed=req.seed)
        ctx = RequestContext(priority=priority)

        async def one(k: int, it) -> JudgeResult:
            if it.response is not None:
                r = await judge.rate_cot(it.prompt, it.response, ctx, rubric=req.rubric, **gen)
                return JudgeResult(
                    index=k,
                    kind="score",
                    score=r.score,
                    rationale=r.rationale,
                    attempts=r.attempts,
                    error=r.error,
                )
            c = await judge.compare(
                it.prompt, it.response_a, it.response_b, ctx, mode="cot", rubric=req.rubric, **gen
            )
            return JudgeResult(
                index=k,
                kind="verdict",
                verdict=c.verdict,
                rationale=c.rationale,
                attempts=c.attempts,
                error=c.error,
            )

        with self.admit(len(req.items)):
            results = await asyncio.gather(*[one(k, it) for k, it in enumerate(req.items)])
        metrics.record_items("judge", judge.name, len(results), sum(r.error is not None for r in results))
        metrics.record_verdicts(judge.name, (r.verdict for r in results if r.verdict is not None))
        metrics.record_tokens(judge.name, ctx)
        return JudgeResponse(judge=judge.name, results=results, usage=_usage(ctx))

    async def winrate(self, req: WinRateRequest, priority: int = 0) -> WinRateResponse:
        judge = self.judge_for(req.judge, "winrate")
        self._check_mode(judge, req.mode)
        self._check_generation(req.max_new_tokens, req.max_retries)
        n = len(req.responses)
        if n > self.limits.max_group_size:
            raise ClientError(
                413,
                "too_large",
                f"a group of {n} responses exceeds the limit of {self.limits.max_group_size} "
                "(limits.max_group_size); split the group or compare each with k opponents",
            )
        self.check_texts(
            [
                *self._prompt_texts("prompt", req.prompt),
                *((f"responses[{k}]", r) for k, r in enumerate(req.responses)),
            ]
        )
        ctx = RequestContext(priority=priority)
        matrix: list[list[float | None]] = [[None] * n for _ in range(n)]
        errors: list[str] = []
        ties = invalid = 0
        scores = None
        if isinstance(judge, ClassifierJudge):
            # N forward passes give every pair: Bradley-Terry needs only the N scores.
            pairs = circular_pairs(n)
            with self.admit(n):
                ratings = await asyncio.gather(*[judge.rate(req.prompt, r, ctx) for r in req.responses])
            scores = [r.score for r in ratings]
            results = [judge.compare_scores(ratings[i], ratings[j]) for i, j in pairs]
            outcomes = [(c.p_first, c.verdict, c.error) for c in results]
        else:
            pairs = circular_pairs(n, req.opponents)
            rng = random.Random(req.seed)
            swaps = [req.order == "random" and rng.random() < 0.5 for _ in pairs]
            opts = self._pair_opts(judge, req)
            # Every comparison of the group goes to the engine at once: they share the question's
            # prefix (cached once) and vLLM batches them together.
            with self.admit(len(pairs) * self._requests_per_pair(judge, req.order)):
                results = await asyncio.gather(
                    *[
                        self._pair(
                            judge, req.prompt, req.responses[i], req.responses[j], req.order, s, ctx, opts
                        )
                        for (i, j), s in zip(pairs, swaps, strict=True)
                    ]
                )
            outcomes = [(r.p_a, r.verdict, r.error) for r in results]
        for (i, j), (p_a, verdict, error) in zip(pairs, outcomes, strict=True):
            credit = p_a if req.soft else verdict_credit(verdict)
            if verdict == "invalid" or credit is None:
                invalid += 1
                errors.append(f"responses {i} vs {j}: {error or 'invalid verdict'}")
                continue
            ties += verdict == "tie"
            matrix[i][j], matrix[j][i] = credit, 1.0 - credit
        rates = win_rates(matrix)
        metrics.record_items("winrate", judge.name, len(pairs), invalid)
        metrics.record_verdicts(judge.name, (v for _, v, _ in outcomes))
        metrics.record_tokens(judge.name, ctx)
        return WinRateResponse(
            judge=judge.name,
            win_rates=rates,
            advantages=group_advantages(rates),
            win_matrix=matrix,
            scores=scores,
            comparisons=len(pairs),
            ties=ties,
            invalid=invalid,
            errors=errors,
            usage=_usage(ctx),
        )

    def describe(self) -> JudgesResponse:
        infos = []
        for cfg in self.settings.judges:
            cls = ClassifierJudge if cfg.kind == "classifier" else GenerativeJudge
            infos.append(
                JudgeInfo(
                    name=cfg.name,
                    kind=cfg.kind,
                    model=cfg.model,
                    default=cfg.name == self.settings.default_judge,
                    routes=list(cls.routes),
                    pairwise_modes=list(cls.pairwise_modes),
                )
            )
        return JudgesResponse(default=self.settings.default_judge, judges=infos)
