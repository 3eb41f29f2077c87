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
from contextlib import asynccontextmanager

from referee.auth import OPEN_TENANT
from referee.protocol import (
    BlobInfo,
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
    content_text,
)
from referee.rewards import (
    bradley_terry_fit,
    bradley_terry_win_rates,
    circular_pairs,
    group_advantages,
    shape_reward,
    verdict_credit,
    win_rates,
)

from . import media, metrics
from .cache import JudgmentCache
from .fairness import AdmissionRefused, FairScheduler, TenantPolicy, retry_after
from .hardware import cpu_bind_for, cpu_info
from .judges import KINDS, Judge, RequestContext, engine_key, load_judge
from .settings import ServerSettings

logger = logging.getLogger(__name__)

DEFAULT_JOB = "default"  # the job of an HTTP request that names none (X-Referee-Job)


class ClientError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def _usage(ctx: RequestContext) -> Usage:
    return Usage(
        prompt_tokens=ctx.prompt_tokens,
        completion_tokens=ctx.completion_tokens,
        engine_requests=ctx.engine_requests,
        cached=ctx.cached,
    )


class JudgeService:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.judges: dict[str, Judge] = {}
        self.load_error: str | None = None
        self.fatal: str | None = None  # set when the server can no longer judge (see lifecycle)
        policies = {
            t.name: TenantPolicy(t.weight, t.max_inflight, t.tokens_per_minute) for t in settings.tenants
        }
        # Tenants do not share prefix-cache blocks (vLLM's cache_salt): a shared cache would let one
        # tenant time another's prompts. With no tenants there is one tenant and nothing to isolate.
        self.scheduler = FairScheduler(
            self.limits.max_inflight,
            self.limits.max_waiting,
            policies,
            isolate_cache=settings.auth,
            max_wait_s=self.limits.max_queue_wait_s,
        )
        # Uploaded images (POST /blobs): in this process, or in Redis when the queue is on (the app
        # swaps in a RedisBlobStore so that every replica and queued job sees the same uploads).
        self.blobs: media.BlobStore = media.MemoryBlobStore(settings.media)
        self.cache = (
            JudgmentCache(settings.cache.max_entries, settings.cache.ttl_s)
            if settings.cache.enabled
            else None
        )

    def context(self, req=None, tenant: str = OPEN_TENANT) -> RequestContext:
        """A request's context: its usage counts, and the judgment cache unless the request (its
        ``cache``, else the settings' ``cache.default``) or the settings turned it off; answers are
        shared within a tenant only."""
        asked = getattr(req, "cache", None)
        use = self.cache is not None and (self.settings.cache.default if asked is None else asked)
        return RequestContext(cache=self.cache if use else None, cache_scope=tenant)

    # ------------------------------------------------------------ lifecycle

    @property
    def ready(self) -> bool:
        return len(self.judges) == len(self.settings.judges)

    async def load(self) -> None:
        """Start every configured engine (in a thread: engine start-up blocks for tens of seconds)."""
        try:
            # one engine per distinct engine_key (judges on the same model share it)
            keys = list(dict.fromkeys(k for cfg in self.settings.judges if (k := engine_key(cfg))))
            count, cores = len(keys), cpu_info().cores
            for cfg in self.settings.judges:
                key = engine_key(cfg)
                bind = cpu_bind_for(keys.index(key) if key else 0, count, self.settings.cpu_binding, cores)
                judge = await asyncio.to_thread(load_judge, cfg, bind, dict(self.judges))
                self.judges[cfg.name] = judge
                logger.info("judge %r (%s, %s) is ready", cfg.name, cfg.kind, cfg.model)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.exception("loading the judges failed")
            raise

    def shutdown(self) -> None:
        engines = {id(j.engine): j for j in self.judges.values() if j.engine is not None}
        for judge in engines.values():  # an engine shared by several judges shuts down once
            judge.shutdown()
        self.judges.clear()

    # ------------------------------------------------------------ validation

    def judge_for(self, name: str | None, route: str) -> Judge:
        if self.fatal:
            raise ClientError(503, "unavailable", f"{self.fatal}; this server is stopping, retry on another")
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

    async def upload(self, raw: bytes, tenant: str = OPEN_TENANT) -> BlobInfo:
        """Keep an image for later requests of the tenant to reference (``POST /blobs``)."""
        try:
            return await media.upload(self.blobs, tenant, raw, self.settings.media)
        except media.MediaError as exc:
            raise ClientError(exc.status, exc.code, exc.message) from None

    async def prepare_media(self, judge: Judge, named: Iterable[tuple[str, object]], tenant: str) -> int:
        """Check that the judge sees the request's images, then decode each distinct one once
        (inline, or an upload of this tenant's). Returns the number of distinct images."""
        parts = media.request_parts(named)
        if not parts:
            return 0
        if "image" not in judge.media:
            raise ClientError(
                422,
                "unsupported_media",
                f"{parts[0][0]} is an image, but judge {judge.name!r} ({judge.settings.model}) sees text "
                "only; send text, or name a judge whose /judges entry lists media: [image]",
            )
        try:
            n = await media.resolve(parts, self.blobs, tenant, self.settings.media)
        except media.MediaError as exc:
            raise ClientError(exc.status, exc.code, exc.message) from None
        metrics.IMAGES.labels(judge.name).inc(n)
        return n

    @staticmethod
    def _validate(judge: Judge, checks: Iterable[tuple[str, object, object]]) -> None:
        """The judge kind's own checks of (where, prompt, response): 422 naming the item."""
        try:
            for where, prompt, response in checks:
                judge.validate(where, prompt, response)
        except ValueError as exc:
            raise ClientError(422, "unsupported_input", str(exc)) from None

    @staticmethod
    def _contents(where: str, item) -> list[tuple[str, object]]:
        """(where, content) of an item's prompt and responses, for ``prepare_media``."""
        fields = ("prompt", "response", "response_a", "response_b", "reference")
        return [(f"{where}.{f}", getattr(item, f)) for f in fields if getattr(item, f, None) is not None]

    def _prompt_texts(self, where: str, prompt) -> list[tuple[str, str]]:
        if isinstance(prompt, str):
            return [(where, prompt)]
        if len(prompt) > self.limits.max_messages:
            raise ClientError(
                413,
                "too_large",
                f"{where} has {len(prompt)} chat messages, over the limit of {self.limits.max_messages} "
                "(limits.max_messages); shorten the conversation",
            )
        return [(f"{where}[{k}].content", content_text(m.content)) for k, m in enumerate(prompt)]

    def _cost(self, units: int, per_unit: int, mode: str, max_retries: int) -> int:
        """Worst-case engine requests: every unit's requests, each retried as often as allowed."""
        cost = units * per_unit * (1 + max_retries if mode == "cot" else 1)
        if cost > self.limits.max_request_cost:
            raise ClientError(
                413,
                "too_large",
                f"this request may need {cost} engine requests ({units} x {per_unit} per item or pair"
                + (f" x {1 + max_retries} attempts" if mode == "cot" and max_retries else "")
                + f"), over the per-request budget of {self.limits.max_request_cost} "
                "(limits.max_request_cost); split it or ask for fewer orders, retries or opponents",
            )
        return cost

    @asynccontextmanager
    async def admit(
        self,
        engine_requests: int,
        ctx: RequestContext,
        tenant: str = OPEN_TENANT,
        job: str = DEFAULT_JOB,
        queued: bool = False,
    ):
        """Hold ``engine_requests`` of the engines' capacity in the tenants' fair order (see
        ``fairness``); the request's engine calls take their priorities from ``ctx``. An HTTP request
        over a limit gets 429 + Retry-After naming it; a queued one waits."""
        limit = self.limits.max_inflight
        if engine_requests > limit:
            raise ClientError(
                413,
                "too_large",
                f"this request needs {engine_requests} engine requests, over the "
                f"in-flight limit of {limit} (limits.max_inflight); split it",
            )
        try:
            async with self.scheduler.admit(tenant, job, engine_requests, wait=queued) as ticket:
                ctx.ticket = ticket
                try:
                    yield ticket
                finally:
                    self.scheduler.record_tokens(tenant, ctx.prompt_tokens + ctx.completion_tokens)
                    metrics.TENANT_ENGINE_REQUESTS.labels(tenant).inc(ctx.engine_requests)
        except AdmissionRefused as exc:
            headers = {"Retry-After": retry_after(exc.retry_after)} if exc.status == 429 else None
            raise ClientError(exc.status, exc.code, exc.message, headers) from None

    # ------------------------------------------------------------ questions

    async def score(
        self, req: ScoreRequest, *, tenant: str = OPEN_TENANT, job: str = DEFAULT_JOB, queued: bool = False
    ) -> ScoreResponse:
        judge = self.judge_for(req.judge, "score")
        self.check_items(len(req.items))
        self.check_texts([("rubric", req.rubric)] if req.rubric is not None else [])
        self.check_texts(
            t
            for k, it in enumerate(req.items)
            for t in [
                *self._prompt_texts(f"items[{k}].prompt", it.prompt),
                (f"items[{k}].response", content_text(it.response)),
                *(
                    [(f"items[{k}].reference", content_text(it.reference))]
                    if it.reference is not None
                    else []
                ),
            ]
        )
        self._validate(
            judge,
            (
                (f"items[{k}].{side}", it.prompt, getattr(it, side))
                for k, it in enumerate(req.items)
                for side in ("response", "reference")
                if getattr(it, side) is not None
            ),
        )
        await self.prepare_media(
            judge,
            (x for k, it in enumerate(req.items) for x in self._contents(f"items[{k}]", it)),
            tenant,
        )
        transform = self._transform(judge, req)
        # Each distinct (prompt, reference) is judged once, however many items share it.
        refs: list[tuple] = []
        for it in req.items:
            if it.reference is not None and (it.prompt, it.reference) not in refs:
                refs.append((it.prompt, it.reference))
        ctx = self.context(req, tenant)
        who = dict(tenant=tenant, job=job, queued=queued)
        units = len(req.items) + len(refs)
        opts = self._options(judge.rating_options, req)
        async with self.admit(self._cost(units, judge.rating_cost(), "logprob", 0), ctx, **who):
            rated = await asyncio.gather(
                *[judge.rate(it.prompt, it.response, ctx, **opts) for it in req.items],
                *[judge.rate(prompt, reference, ctx, **opts) for prompt, reference in refs],
            )
        ratings, ref_ratings = rated[: len(req.items)], rated[len(req.items) :]
        results = []
        for k, (it, r) in enumerate(zip(req.items, ratings, strict=True)):
            result = ScoreResult(
                index=k,
                score=r.score,
                label_mass=r.label_mass,
                objectives=r.objectives,
                members=r.members,
                uncertainty=r.uncertainty,
                error=r.error,
            )
            if transform != "none":
                ref = it.reference_score
                if it.reference is not None:
                    rr = ref_ratings[refs.index((it.prompt, it.reference))]
                    ref = rr.reward
                    if ref is None and result.error is None:
                        result.error = f"the reference could not be judged: {rr.error or 'no reward'}"
                result.raw_score, result.reference_score = r.reward, ref
                result.score = None
                if r.reward is not None and ref is not None:
                    result.score = shape_reward(r.reward, ref, transform)
            results.append(result)
        metrics.record_items("score", judge.name, len(results), sum(r.error is not None for r in results))
        metrics.record_tokens(judge.name, ctx)
        return ScoreResponse(judge=judge.name, results=results, usage=_usage(ctx))

    @staticmethod
    def _options(make, req) -> dict:
        try:
            return make(req)
        except ValueError as exc:
            raise ClientError(400, "bad_request", str(exc)) from None

    @staticmethod
    def _transform(judge: Judge, req: ScoreRequest) -> str:
        """The request's reward shaping (else the judge's), checked against the items' references."""
        transform = req.transform or getattr(judge.settings, "transform", "none")
        for k, it in enumerate(req.items):
            has_reference = it.reference is not None or it.reference_score is not None
            if transform != "none" and not has_reference:
                raise ClientError(
                    422,
                    "invalid_request",
                    f"items[{k}]: transform={transform} shapes a reward against the prompt's reference: "
                    "give items[k].reference (a reference response to judge) or items[k].reference_score",
                )
            if transform == "none" and has_reference:
                raise ClientError(
                    422,
                    "invalid_request",
                    f"items[{k}] has a reference, but no transform uses it: give transform=par or "
                    "transform=log_sigmoid, or leave the reference out",
                )
        return transform

    @staticmethod
    def _low_label_mass(judge: Judge, r: PairwiseResult) -> bool:
        """Made invalid by the min_label_mass rule (no label at all was invalid before the rule)."""
        mass = r.label_mass
        return r.verdict == "invalid" and mass is not None and 0.0 < mass < judge.settings.min_label_mass

    async def pairwise(
        self, req: PairwiseRequest, *, tenant: str = OPEN_TENANT, job: str = DEFAULT_JOB, queued: bool = False
    ) -> PairwiseResponse:
        judge = self.judge_for(req.judge, "pairwise")
        self._check_mode(judge, req.mode)
        self.check_items(len(req.items))
        self._check_generation(req.max_new_tokens, req.max_retries)
        self.check_texts([("rubric", req.rubric)] if req.rubric is not None else [])
        self.check_texts(
            t
            for k, it in enumerate(req.items)
            for t in [
                *self._prompt_texts(f"items[{k}].prompt", it.prompt),
                (f"items[{k}].response_a", content_text(it.response_a)),
                (f"items[{k}].response_b", content_text(it.response_b)),
            ]
        )
        self._validate(
            judge,
            (
                (f"items[{k}].{side}", it.prompt, getattr(it, side))
                for k, it in enumerate(req.items)
                for side in ("response_a", "response_b")
            ),
        )
        await self.prepare_media(
            judge,
            (x for k, it in enumerate(req.items) for x in self._contents(f"items[{k}]", it)),
            tenant,
        )
        rng = random.Random(req.seed)
        swaps = [req.order == "random" and rng.random() < 0.5 for _ in req.items]
        opts = self._options(judge.pair_options, req)
        rule = judge.inconsistent_rule(req)
        ctx = self.context(req, tenant)
        who = dict(tenant=tenant, job=job, queued=queued)
        per_pair = judge.pair_cost(req.order)
        async with self.admit(self._cost(len(req.items), per_pair, req.mode, req.max_retries), ctx, **who):
            results = await asyncio.gather(
                *[
                    judge.judge_pair(
                        it.prompt,
                        it.response_a,
                        it.response_b,
                        ctx,
                        order=req.order,
                        swap=swap,
                        opts=opts,
                        rule=rule,
                    )
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

    async def judge(
        self, req: JudgeRequest, *, tenant: str = OPEN_TENANT, job: str = DEFAULT_JOB, queued: bool = False
    ) -> JudgeResponse:
        judge = self.judge_for(req.judge, "judge")  # a kind that serves /judge reasons (rate_cot)
        self.check_items(len(req.items))
        self._check_generation(req.max_new_tokens, req.max_retries)
        texts = []
        for k, it in enumerate(req.items):
            texts += self._prompt_texts(f"items[{k}].prompt", it.prompt)
            texts += [
                (f"items[{k}].{f}", content_text(getattr(it, f)))
                for f in ("response", "response_a", "response_b")
                if getattr(it, f) is not None
            ]
        if req.rubric is not None:
            texts.append(("rubric", req.rubric))
        self.check_texts(texts)
        await self.prepare_media(
            judge,
            (x for k, it in enumerate(req.items) for x in self._contents(f"items[{k}]", it)),
            tenant,
        )
        gen = dict(max_new_tokens=req.max_new_tokens, max_retries=req.max_retries, seed=req.seed)
        ctx = self.context(req, tenant)
        who = dict(tenant=tenant, job=job, queued=queued)

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

        async with self.admit(self._cost(len(req.items), 1, "cot", req.max_retries), ctx, **who):
            results = await asyncio.gather(*[one(k, it) for k, it in enumerate(req.items)])
        metrics.record_items("judge", judge.name, len(results), sum(r.error is not None for r in results))
        metrics.record_verdicts(judge.name, (r.verdict for r in results if r.verdict is not None))
        metrics.record_tokens(judge.name, ctx)
        return JudgeResponse(judge=judge.name, results=results, usage=_usage(ctx))

    async def winrate(
        self, req: WinRateRequest, *, tenant: str = OPEN_TENANT, job: str = DEFAULT_JOB, queued: bool = False
    ) -> WinRateResponse:
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
        self.check_texts([("rubric", req.rubric)] if req.rubric is not None else [])
        self.check_texts(
            [
                *self._prompt_texts("prompt", req.prompt),
                *((f"responses[{k}]", content_text(r)) for k, r in enumerate(req.responses)),
            ]
        )
        self._validate(judge, ((f"responses[{k}]", req.prompt, r) for k, r in enumerate(req.responses)))
        await self.prepare_media(
            judge,
            [("prompt", req.prompt), *((f"responses[{k}]", r) for k, r in enumerate(req.responses))],
            tenant,
        )
        ctx = self.context(req, tenant)
        who = dict(tenant=tenant, job=job, queued=queued)
        matrix: list[list[float | None]] = [[None] * n for _ in range(n)]
        errors: list[str] = []
        ties = invalid = inconsistent = low_mass = 0
        rule = judge.inconsistent_rule(req) if req.order == "both" and not judge.pointwise else None
        opts = self._options(judge.pair_options, req)
        rankings = None
        if req.schedule == "listwise":
            if "listwise" not in judge.schedules:
                raise ClientError(
                    400,
                    "unsupported",
                    f"judge {judge.name!r} ({judge.kind}) cannot rank a group in one call; "
                    "schedule=listwise needs a generative judge",
                )
            if req.opponents is not None:
                raise ClientError(
                    400, "bad_request", "schedule=listwise ranks the whole group: leave out opponents"
                )
            pairs = circular_pairs(n)
            cost = self._cost(1, judge.list_cost(req.order), "cot", req.max_retries)
            async with self.admit(cost, ctx, **who):
                results, rankings = await judge.judge_list(
                    req.prompt,
                    req.responses,
                    ctx,
                    order=req.order,
                    seed=req.seed,
                    opts=opts,
                    rule=rule or "tie",
                )
            ratings = None
        else:
            pairs = judge.schedule(n, req.opponents)
            rng = random.Random(req.seed)
            swaps = [req.order == "random" and rng.random() < 0.5 for _ in pairs]
            cost = self._cost(1, judge.group_cost(n, pairs, req.order), req.mode, req.max_retries)
            async with self.admit(cost, ctx, **who):
                results, ratings = await judge.judge_group(
                    req.prompt,
                    req.responses,
                    pairs,
                    ctx,
                    order=req.order,
                    swaps=swaps,
                    opts=opts,
                    rule=rule or "tie",
                )
        scores = None if ratings is None else [r.score for r in ratings]
        spreads = None if ratings is None else [r.uncertainty for r in ratings]
        outcomes = [(r.p_a, r.verdict, r.error) for r in results]
        flags = [(r.inconsistent_rule is not None, self._low_label_mass(judge, r)) for r in results]
        for changed, low in flags:
            inconsistent += changed
            low_mass += low
        for (i, j), (p_a, verdict, error) in zip(pairs, outcomes, strict=True):
            credit = p_a if req.soft else verdict_credit(verdict)
            if verdict == "invalid" or credit is None:
                invalid += 1
                errors.append(f"responses {i} vs {j}: {error or 'invalid verdict'}")
                continue
            ties += verdict == "tie"
            matrix[i][j], matrix[j][i] = credit, 1.0 - credit
        if req.estimate == "bradley_terry":
            rates = bradley_terry_win_rates(matrix)
            if scores is None:
                scores = bradley_terry_fit(matrix)
        else:
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
            uncertainties=spreads if spreads and any(u is not None for u in spreads) else None,
            comparisons=len(pairs),
            rankings=rankings,
            ties=ties,
            invalid=invalid,
            inconsistent=inconsistent,
            inconsistent_rule=rule,
            low_label_mass=low_mass,
            errors=errors,
            usage=_usage(ctx),
        )

    def describe(self) -> JudgesResponse:
        infos = []
        for cfg in self.settings.judges:
            loaded = self.judges.get(cfg.name)
            kind = loaded or KINDS[cfg.kind]
            routes = kind.routes if not isinstance(kind.routes, property) else ()
            modes = kind.pairwise_modes if not isinstance(kind.pairwise_modes, property) else ()
            infos.append(
                JudgeInfo(
                    name=cfg.name,
                    kind=cfg.kind,
                    model=cfg.model,
                    default=cfg.name == self.settings.default_judge,
                    routes=list(routes),
                    pairwise_modes=list(modes),
                    media=judge.media if (judge := self.judges.get(cfg.name)) else [],
                    objectives=list(getattr(loaded, "objectives", ())),
                    weights=getattr(loaded, "weights", None) or None,
                    members=list(cfg.members),
                    dtype=getattr(getattr(loaded, "engine", None), "dtype", None),
                )
            )
        return JudgesResponse(default=self.settings.default_judge, judges=infos)
