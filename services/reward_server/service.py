"""The judge service: the one pipeline every question runs through, HTTP and queue alike.

choose the judge -> normalise content -> check limits -> the route's and the kind's checks ->
decode media -> admit (fair share, deadline, cost) -> run -> record metrics -> answer
(``ask``; ``session`` is the same up to admission, for answers that stream). What differs by route
lives in ``questions``. Client mistakes raise ``ClientError`` with the HTTP status and a message
that says what to change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterable
from contextlib import asynccontextmanager

from referee.auth import OPEN_TENANT
from referee.health import tally_answer
from referee.protocol import (
    BlobInfo,
    JudgeInfo,
    JudgeRequest,
    JudgeResponse,
    JudgesResponse,
    PairwiseRequest,
    PairwiseResponse,
    ScoreRequest,
    ScoreResponse,
    Usage,
    WinRateRequest,
    WinRateResponse,
)

from . import media, memory_plan, metrics
from .cache import JudgmentCache
from .engine_types import REQUEST_AFFINITY, BackendsUnavailable
from .errors import ClientError
from .fairness import AdmissionRefused, FairScheduler, TenantPolicy, retry_after
from .hardware import cpu_bind_for, cpu_info, device_type
from .health import HealthStore
from .judges import Judge, RequestContext, capabilities, engine_key, load_judge
from .questions import (
    Cost,
    CotJudgeQuestion,
    Outcome,
    PairwiseQuestion,
    Question,
    ScoreQuestion,
    WinRateQuestion,
    prompt_texts,
)
from .settings import ServerSettings

logger = logging.getLogger(__name__)

DEFAULT_JOB = "default"  # the job of an HTTP request that names none (X-Referee-Job)


def _usage(ctx: RequestContext) -> Usage:
    return Usage(
        prompt_tokens=ctx.prompt_tokens,
        completion_tokens=ctx.completion_tokens,
        engine_requests=ctx.engine_requests,
        cached=ctx.cached,
    )


def _local_engine_key(cfg) -> tuple | None:
    """The key of the engine a judge starts in this process (None: an ensemble, a remote judge)."""
    key = engine_key(cfg)
    return key if key is not None and cfg.engine.remote is None else None


class JudgeService:
    """Built once at start with everything it uses: ``blobs`` is where uploaded images live (this
    process by default; Redis when the queue is on, so that every replica and queued job sees the
    same uploads), and ``shared_redis`` lets the judgment cache share answers between replicas."""

    def __init__(
        self,
        settings: ServerSettings,
        *,
        blobs: media.BlobStore | None = None,
        shared_redis=None,
        shared_prefix: str = "referee",
    ) -> None:
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
            self.limits.max_inflight_engine_requests,
            self.limits.max_waiting_engine_requests,
            policies,
            isolate_cache=settings.auth,
            max_wait_s=self.limits.max_admission_wait_s,
            tenant_share=self.limits.tenant_share,
        )
        self.blobs: media.BlobStore = blobs or media.MemoryBlobStore(settings.media)
        # Decoded images of all admitted requests together; with tenants, a share per tenant.
        self.pixels = media.PixelBudget(
            settings.media.max_decoded_pixels, share=self.limits.tenant_share if settings.auth else None
        )
        cache = settings.cache
        self.cache = (
            JudgmentCache(
                cache.max_entries,
                cache.ttl_s,
                redis=shared_redis if cache.shared else None,
                prefix=shared_prefix,
            )
            if cache.enabled
            else None
        )
        # What the judge gave each job (referee.health): in Redis with the queue, so every replica adds
        self.health = HealthStore(settings.health, redis=shared_redis, prefix=shared_prefix)

    def context(self, asked: bool | None = None, tenant: str = OPEN_TENANT) -> RequestContext:
        """A request's context: its usage counts, and the judgment cache unless the request (its
        ``cache``, else the settings' ``cache.default``) or the settings turned it off; answers are
        shared within a tenant only."""
        use = self.cache is not None and (self.settings.cache.default if asked is None else asked)
        return RequestContext(cache=self.cache if use else None, cache_scope=tenant)

    # ------------------------------------------------------------ lifecycle

    @property
    def ready(self) -> bool:
        return len(self.judges) == len(self.settings.judges)

    async def load(self) -> None:
        """Start every configured engine (in a thread: engine start-up blocks for tens of seconds)."""
        try:
            # On GPUs, the memory plan first: an impossible plan is refused before anything loads,
            # naming the judge and the fraction that would fit; it also places each engine.
            platform = await asyncio.to_thread(device_type)
            plan = memory_plan.check_before_loading(self.settings, platform)
            # one engine per distinct engine_key (judges on the same model share it)
            # (a remote judge's engine runs elsewhere: it takes no cores here)
            keys = list(dict.fromkeys(k for cfg in self.settings.judges if (k := _local_engine_key(cfg))))
            count, cores = len(keys), cpu_info().cores
            for cfg in self.settings.judges:
                key = _local_engine_key(cfg)
                bind = cpu_bind_for(keys.index(key) if key else 0, count, self.settings.cpu_binding, cores)
                placement = None
                if plan is not None and key:
                    with contextlib.suppress(KeyError):  # a judge the plan could not check
                        placement = plan.placement(cfg.name)
                judge = await asyncio.to_thread(load_judge, cfg, bind, dict(self.judges), placement)
                if hasattr(
                    getattr(judge, "engine", None), "watch"
                ):  # a remote judge: its health checks on a timer, here
                    judge.engine.watch()
                self.judges[cfg.name] = judge
                logger.info("judge %r (%s, %s) is ready", cfg.name, cfg.kind, cfg.model)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.exception("loading the judges failed")
            raise

    def remote_status(self) -> dict[str, list[dict]]:
        """Each remote judge's backends and their states (``/readyz``, ``/judges``); asking starts
        the health checks that are due, so a backend that came back is seen."""
        out = {}
        for name, judge in self.judges.items():
            engine = getattr(judge, "engine", None)
            if engine is not None and hasattr(engine, "backends"):
                engine.refresh()
                out[name] = engine.status()
        return out

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

    def _check_generation(self, max_new_tokens: int | None, max_retries: int, samples: int = 1) -> None:
        if samples > self.limits.max_samples:
            raise ClientError(
                422,
                "invalid_request",
                f"samples={samples} is over the limit of {self.limits.max_samples} (limits.max_samples)",
            )
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

    async def check_media(
        self, judge: Judge, named: Iterable[tuple[str, object]], tenant: str
    ) -> media.MediaPlan | None:
        """Check that the judge sees the request's images, fetch each distinct one once (inline, or
        an upload of this tenant's) and check its header and the request's pixel budget; nothing
        is decoded yet (``decode_media``, once the request is admitted)."""
        parts = media.request_parts(named)
        if not parts:
            return None
        if "image" not in judge.media:
            raise ClientError(
                422,
                "unsupported_media",
                f"{parts[0][0]} is an image, but judge {judge.name!r} ({judge.settings.model}) sees text "
                "only; send text, or name a judge whose /judges entry lists media: [image]",
            )
        try:
            return await media.probe(parts, self.blobs, tenant, self.settings.media)
        except media.MediaError as exc:
            raise ClientError(exc.status, exc.code, exc.message) from None

    @asynccontextmanager
    async def hold_pixels(self, plan: media.MediaPlan | None, tenant: str):
        """Hold room for the request's decoded images (``media.max_decoded_pixels``) until it is
        answered; 413 if they could never fit, 429 if no room is made in time."""
        pixels = plan.pixels if plan is not None else 0
        try:
            async with self.pixels.hold(pixels, tenant, self.limits.max_admission_wait_s):
                yield
        except media.MediaError as exc:
            headers = {"Retry-After": "1"} if exc.status == 429 else None
            raise ClientError(exc.status, exc.code, exc.message, headers) from None

    async def decode_media(self, judge: Judge, plan: media.MediaPlan | None) -> int:
        """Decode the checked images (after admission: a request refused costs no decoding)."""
        if plan is None:
            return 0
        try:
            n = await media.decode(plan)
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

    def _prompt_texts(self, where: str, prompt) -> list[tuple[str, str]]:
        if not isinstance(prompt, str) and len(prompt) > self.limits.max_messages:
            raise ClientError(
                413,
                "too_large",
                f"{where} has {len(prompt)} chat messages, over the limit of {self.limits.max_messages} "
                "(limits.max_messages); shorten the conversation",
            )
        return prompt_texts(where, prompt)

    def _cost(self, cost: Cost) -> int:
        """Worst-case engine requests: every unit's requests, each retried as often as allowed."""
        total = cost.engine_requests
        if total > self.limits.max_request_cost:
            raise ClientError(
                413,
                "too_large",
                f"this request may need {total} engine requests "
                f"({cost.units} x {cost.per_unit} per item or pair"
                + (f" x {cost.attempts} attempts" if cost.attempts > 1 else "")
                + f"), over the per-request budget of {self.limits.max_request_cost} "
                "(limits.max_request_cost); split it or ask for fewer orders, retries or opponents",
            )
        return total

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
        limit = self.limits.max_inflight_engine_requests
        if engine_requests > limit:
            raise ClientError(
                413,
                "too_large",
                f"this request needs {engine_requests} engine requests, over the "
                f"in-flight limit of {limit} (limits.max_inflight_engine_requests); split it",
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

    # ------------------------------------------------------------ the one pipeline

    def check_limits(self, q: Question) -> None:
        """Every limit on what a request may ask, for every route: items, group size, chat
        messages, characters per text and per request, reasoning budget and retries."""
        self.check_items(q.items())
        n = q.group_size()
        if n is not None and n > self.limits.max_group_size:
            raise ClientError(
                413,
                "too_large",
                f"a group of {n} responses exceeds the limit of {self.limits.max_group_size} "
                "(limits.max_group_size); split the group or compare each with k opponents",
            )
        texts = [t for where, prompt in q.prompts() for t in self._prompt_texts(where, prompt)]
        texts += list(q.texts())
        self.check_texts(texts)
        total, budget = sum(len(text) for _, text in texts), self.limits.max_request_chars
        if total > budget:
            raise ClientError(
                413,
                "too_large",
                f"this request's texts have {total} characters together, over the limit of {budget} "
                "per request (limits.max_request_chars); split it into smaller requests",
            )
        self._check_generation(*q.generation())
        q.check(self.limits)

    @asynccontextmanager
    async def session(
        self, q: Question, *, tenant: str = OPEN_TENANT, job: str = DEFAULT_JOB, queued: bool = False
    ):
        """Everything before a question runs: choose the judge, normalise content, check limits,
        the route's and the judge kind's own checks, check media (headers and budgets), then hold
        its cost in the fair order and decode the media. Yields (judge, context); the caller runs
        the question inside."""
        judge = q.choose(self)
        q.normalise()
        self.check_limits(q)
        q.prepare(judge)
        self._validate(judge, q.judged())
        images = await self.check_media(judge, q.contents(), tenant)
        cost = self._cost(q.cost(judge))
        ctx = self.context(q.cache, tenant)
        async with (
            self.admit(cost, ctx, tenant=tenant, job=job, queued=queued),
            self.hold_pixels(images, tenant),  # once admitted: a request refused holds no pixels
        ):
            await self.decode_media(judge, images)
            # one key per question: a remote judge keeps its calls (a group's comparisons) on one backend
            affinity = REQUEST_AFFINITY.set(uuid.uuid4().hex)
            try:
                yield judge, ctx
            finally:
                with contextlib.suppress(ValueError):  # left in another context (a streamed answer)
                    REQUEST_AFFINITY.reset(affinity)

    def record(
        self,
        q: Question,
        judge: Judge,
        ctx: RequestContext,
        outcome: Outcome | None,
        *,
        tenant: str = OPEN_TENANT,
        job: str = DEFAULT_JOB,
        answer=None,
    ) -> None:
        """The metrics every answered question counts, and its judge-health tally (native answers)."""
        if outcome is not None:
            metrics.record_items(q.route, judge.name, outcome.items, outcome.errors)
            metrics.record_verdicts(judge.name, outcome.verdicts)
        metrics.record_tokens(judge.name, ctx)
        if answer is not None:
            try:
                self.health.add(tenant, job, judge.name, q.route, tally_answer(q.request, answer))
            except Exception:  # telemetry never fails an answer
                logger.exception("judge-health tally failed")

    async def ask(
        self, q: Question, *, tenant: str = OPEN_TENANT, job: str = DEFAULT_JOB, queued: bool = False
    ):
        """Run one question through the pipeline and build its answer."""
        async with self.session(q, tenant=tenant, job=job, queued=queued) as (judge, ctx):
            try:
                result = await q.run(judge, ctx)
            except BackendsUnavailable as exc:  # a remote judge's servers are all out
                raise ClientError(503, "backend_unavailable", str(exc), {"Retry-After": "5"}) from None
        answer = q.answer(judge, result, _usage(ctx))
        self.record(q, judge, ctx, q.outcome(result, answer), tenant=tenant, job=job, answer=answer)
        return answer

    # The native routes' questions (also what queued messages of each type ask).
    async def score(self, req: ScoreRequest, **who) -> ScoreResponse:
        return await self.ask(ScoreQuestion(req), **who)

    async def pairwise(self, req: PairwiseRequest, **who) -> PairwiseResponse:
        return await self.ask(PairwiseQuestion(req), **who)

    async def judge(self, req: JudgeRequest, **who) -> JudgeResponse:
        return await self.ask(CotJudgeQuestion(req), **who)

    async def winrate(self, req: WinRateRequest, **who) -> WinRateResponse:
        return await self.ask(WinRateQuestion(req), **who)

    def describe(self) -> JudgesResponse:
        infos = []
        remote = self.remote_status()
        for cfg in self.settings.judges:
            loaded = self.judges.get(cfg.name)
            caps = loaded.capabilities if loaded else capabilities(cfg, self.settings.judges)
            infos.append(
                JudgeInfo(
                    name=cfg.name,
                    kind=cfg.kind,
                    model=cfg.model,
                    default=cfg.name == self.settings.default_judge,
                    routes=list(caps.routes),
                    pairwise_modes=list(caps.pairwise_modes),
                    media=judge.media if (judge := self.judges.get(cfg.name)) else [],
                    objectives=list(getattr(loaded, "objectives", ())),
                    weights=getattr(loaded, "weights", None) or None,
                    members=list(cfg.members),
                    dtype=getattr(getattr(loaded, "engine", None), "dtype", None),
                    engine=getattr(getattr(loaded, "engine", None), "choices", None) or None,
                    backends=remote.get(cfg.name),
                )
            )
        return JudgesResponse(default=self.settings.default_judge, judges=infos)
