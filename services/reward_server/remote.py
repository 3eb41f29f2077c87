"""A judge's engine that already runs elsewhere: a fleet of OpenAI-compatible servers (``vllm serve``,
SGLang, referee's own ``/v1``) answering what referee asks an in-process engine.

Everything above the engine stays referee's: the prompts are built and tokenised here with the
model's own tokenizer (user text never becomes control tokens: ``tokens``), and the servers get
token ids, never text to template (vLLM's and SGLang's completions and classify endpoints take
them); both-order debiasing, win-rate schedules, the judgment cache, tenants' fair shares and
strict verdict parsing work unchanged. What each call becomes:

- ``complete``: ``POST /v1/completions`` with the prompt's token ids, ``logprobs`` and
  ``return_tokens_as_token_ids`` (the top log-probabilities keyed by token id, not by text);
- ``prompt_logprobs``: the same with vLLM's ``prompt_logprobs: 0``;
- ``classify`` / ``classify_all``: ``POST /classify`` (vLLM) with the token ids and no activation;
- priorities (``priorities: true``, for servers run with ``--scheduling-policy priority``) and
  per-tenant ``cache_salt`` are passed on.

With ``api: chat`` (hosted APIs that take only messages) a generative judge's prompt goes to
``POST /v1/chat/completions`` as the chat messages referee built (every judged text in them defused
as always), the server applies its own chat template, and the labels are read from the top
log-probabilities by token text (each text mapped back to its single token id with the judge's
tokenizer); chain-of-thought is the message's content. Other kinds need token ids and are refused.

The fleet: the calls of one request (``REQUEST_AFFINITY``: a /winrate group, one queued message) go
to one backend, chosen among the healthy ones by rendezvous (highest-random-weight) hashing of the
request's key, so that a group's comparisons, which share their prompt, reuse that backend's prefix
cache; taking a backend out moves only its own requests. Where the chosen backend has more than
``affinity_max_skew`` calls in flight beyond the least busy one, or with ``affinity: false``, a
call goes to the healthy backend with the fewest calls in flight (at most ``max_concurrency``
each). A failure that is safe to retry (connection error, timeout, 429, 5xx) is retried with
backoff on another backend where there is one, up to ``retries`` times; a 4xx is the request's own
fault and is never retried. ``failures_to_open`` consecutive failures take a backend out (its
circuit opens) for ``open_s``; then one health check (``GET /health``, else ``/v1/models``) brings
it back: a background task checks the backends that are out every ``health_interval_s``, so a
backend comes back without traffic. With every backend out a call fails with
``BackendsUnavailable``: the request is answered 503 with the reason, never with a value, and the
server stays up. Hosted APIs may get ``requests_per_minute`` and ``tokens_per_minute`` budgets (a
call waits for its share).
(Retries with backoff, a circuit breaker and rpm/tpm limiters are the usual client-side tools for a
shared model service; verl's reward-model router and limiter for external judge APIs do the same.)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import time
from dataclasses import dataclass, field

import httpx
from prometheus_client import Counter, Gauge
from transformers import AutoTokenizer

from referee.embedded import resolve_model

from .engine import Engine
from .engine_types import REQUEST_AFFINITY, BackendsUnavailable, Completion
from .judge_settings import EngineSettings, RemoteSettings

logger = logging.getLogger(__name__)

CALLS = Counter(
    "referee_remote_calls_total",
    "Calls to remote judges' servers, by model, backend and outcome (answered, retryable: a failure "
    "retried or counted against the backend, refused: the request's own 4xx).",
    ["model", "backend", "outcome"],
)
BACKEND_UP = Gauge(
    "referee_remote_backend_up",
    "1 while a remote judge's server is in the fleet, 0 while out.",
    ["model", "backend"],
)

_RETRYABLE = {408, 425, 429}  # and every 5xx: the server's trouble, not the request's


class BackendRefused(ValueError):
    """A backend answered the request with a 4xx (the request's own fault): the item's error."""


class ChatPrompt(list):
    """A judge prompt's token ids (referee's template, for lengths and cache keys) and the chat
    messages they were made from, which a chat-api backend is sent instead."""

    def __init__(self, ids: list[int], messages: list[dict]) -> None:
        super().__init__(ids)
        self.messages = messages


@dataclass
class Backend:
    url: str
    client: httpx.AsyncClient
    slots: asyncio.Semaphore
    inflight: int = 0
    failures: int = 0  # consecutive
    open_until: float = 0.0  # out until then (its circuit open)
    state: str = "up"  # up | out
    last_error: str | None = None
    answered: int = 0
    failed: int = 0
    checking: bool = field(default=False)

    def status(self) -> dict:
        return {
            "url": self.url,
            "state": self.state,
            "inflight": self.inflight,
            "answered": self.answered,
            "failed": self.failed,
            "last_error": self.last_error,
        }


class _Budget:
    """A per-minute budget (requests or tokens): a call waits until the last minute's use leaves
    room for it."""

    def __init__(self, per_minute: float) -> None:
        self.per_minute = per_minute
        self.used: list[tuple[float, float]] = []  # (time, amount)

    async def take(self, amount: float) -> None:
        amount = min(amount, self.per_minute)  # a call bigger than the budget still goes, alone
        while True:
            now = time.monotonic()
            self.used = [(t, a) for t, a in self.used if now - t < 60.0]
            if sum(a for _, a in self.used) + amount <= self.per_minute:
                self.used.append((now, amount))
                return
            await asyncio.sleep(max(0.05, 60.0 - (now - self.used[0][0])))


class RemoteEngine(Engine):
    """An ``Engine`` whose model runs on remote servers; the tokenizer runs here."""

    def __init__(self, tokenizer, model_path: str, runner: str, remote: RemoteSettings, max_model_len: int):
        self._llm = None
        self._priorities = remote.priorities
        self._cpu = False
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.runner = runner
        self.remote = remote
        self.max_model_len = max_model_len
        self.dtype = "remote"
        self.dtype_reason = "the servers' own"
        self.choices = {"backends": ", ".join(remote.urls), "api": remote.api}
        self.image_placeholder = None  # images are not sent to remote judges (yet): refused up front
        self.media = []
        self.served_model = remote.served_model or model_path
        self.fingerprint = f"remote:{self.served_model}"
        key = os.environ.get(remote.api_key_env) if remote.api_key_env else None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        timeout = httpx.Timeout(remote.timeout_s, connect=min(10.0, remote.timeout_s))
        self.backends = [
            Backend(
                url.rstrip("/"),
                httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout),
                asyncio.Semaphore(remote.max_concurrency),
            )
            for url in remote.urls
        ]
        self._requests = _Budget(remote.requests_per_minute) if remote.requests_per_minute else None
        self._tokens = _Budget(remote.tokens_per_minute) if remote.tokens_per_minute else None
        self.retried = 0  # tries after a retryable failure (metrics, tests)
        self._watching: asyncio.Task | None = None  # the health-check timer (``watch``)
        self._checks: set[asyncio.Task] = set()  # health checks started by requests (``refresh``)
        self._text_ids: dict[str, int | None] = {}  # api chat: a top-logprob token's text -> its id

    # ------------------------------------------------------------ start-up

    @classmethod
    def start_remote(cls, model: str, settings: EngineSettings, runner: str) -> RemoteEngine:
        """Load the tokenizer here, then ask the servers what they serve: the model must be listed
        (its context length is taken from there), and the runner's endpoint must answer one probe.
        A backend that does not answer at start is out until its health check passes; none
        answering is a load error with each backend's reason."""
        remote = settings.remote
        assert remote is not None
        path = resolve_model(model)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return asyncio.run(cls._probe(tokenizer, path, runner, remote, settings.max_model_len))

    @classmethod
    async def _probe(cls, tokenizer, path, runner, remote, max_model_len) -> RemoteEngine:
        engine = cls(tokenizer, path, runner, remote, max_model_len)
        reasons = []
        try:
            for b in engine.backends:
                try:
                    engine.max_model_len = await engine._check(b, runner)
                except Exception as exc:
                    reasons.append(f"{b.url}: {exc}")
                    b.state, b.open_until, b.last_error = "out", time.monotonic() + remote.open_s, str(exc)
            if len(reasons) == len(engine.backends):
                raise RuntimeError(f"no backend of {engine.served_model!r} can judge: " + "; ".join(reasons))
        finally:
            # the clients were made on this (start-up) event loop: new ones for the server's loop
            for b in engine.backends:
                await b.client.aclose()
        for b in engine.backends:
            b.client = httpx.AsyncClient(
                base_url=b.url, headers=dict(b.client.headers), timeout=b.client.timeout
            )
            b.slots = asyncio.Semaphore(remote.max_concurrency)
        for reason in reasons:
            logger.warning("remote judge backend out at start: %s", reason)
        for b in engine.backends:
            BACKEND_UP.labels(engine.served_model, b.url).set(1 if b.state == "up" else 0)
        return engine

    async def _check(self, b: Backend, runner: str) -> int:
        """What a backend serves: the model's context length, after one probe of the runner's endpoint."""
        listed = await b.client.get("/v1/models")
        listed.raise_for_status()
        models = {m.get("id"): m for m in listed.json().get("data", [])}
        if self.served_model not in models:
            raise RuntimeError(
                f"it serves {sorted(models)}, not {self.served_model!r} (set remote.served_model)"
            )
        length = int(models[self.served_model].get("max_model_len") or self.max_model_len)
        if self.remote.api == "chat":
            if runner != "generate":
                raise RuntimeError("api: chat answers generative judges only (other kinds need token ids)")
            body = {
                "model": self.served_model,
                "messages": [{"role": "user", "content": "Hello"}],
                "max_tokens": 1,
                "logprobs": True,
                "top_logprobs": 1,
            }
            r = await b.client.post("/v1/chat/completions", json=body)
            if r.status_code >= 400:
                raise RuntimeError(
                    "it does not answer chat completions with log-probabilities (POST "
                    f"/v1/chat/completions: {r.status_code} {r.text[:200]})"
                )
            choice = (r.json().get("choices") or [{}])[0]
            if not ((choice.get("logprobs") or {}).get("content") or [{}])[0].get("top_logprobs"):
                raise RuntimeError("its chat completions return no top log-probabilities (logprobs)")
            return length
        ids = self.prompts.data_ids("Hello")
        if runner == "pooling":
            r = await b.client.post("/classify", json={"model": self.served_model, "input": ids})
            if r.status_code >= 400:
                raise RuntimeError(
                    f"it does not classify token ids (POST /classify: {r.status_code} {r.text[:200]})"
                )
        else:
            body = {"model": self.served_model, "prompt": ids, "max_tokens": 1, "logprobs": 1}
            r = await b.client.post("/v1/completions", json={**body, "return_tokens_as_token_ids": True})
            if r.status_code >= 400:
                raise RuntimeError(
                    f"it does not complete token ids (POST /v1/completions: {r.status_code} {r.text[:200]})"
                )
            tops = ((r.json().get("choices") or [{}])[0].get("logprobs") or {}).get("top_logprobs") or []
            named = [t for t in (tops[0] or {}) if not t.startswith("token_id:")] if tops else []
            if named:  # e.g. SGLang's completions: labels would be read by text, which api: chat does
                raise RuntimeError(
                    f"its top log-probabilities name tokens by text ({named[0]!r}), not by id "
                    "(return_tokens_as_token_ids); use api: chat for this server"
                )
        return length

    # ------------------------------------------------------------ the fleet

    def status(self) -> list[dict]:
        return [b.status() for b in self.backends]

    def _due(self) -> list[Backend]:
        """The backends that are out and due for a health check, marked as being checked."""
        now = time.monotonic()
        due = [b for b in self.backends if b.state == "out" and now >= b.open_until and not b.checking]
        for b in due:
            b.checking = True
        return due

    def refresh(self) -> None:
        """Health-check, in the background, the backends that are out and due for a check."""
        for b in self._due():
            task = asyncio.get_running_loop().create_task(self._health_check(b))
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)

    def watch(self) -> None:
        """Start the health-check timer on the running loop (the server's): every
        ``health_interval_s`` the backends that are out and due are checked, so that a backend that
        returns is back in the fleet without a request having to find it. Cancelled by ``shutdown``."""
        if self._watching is None or self._watching.done():
            self._watching = asyncio.get_running_loop().create_task(
                self._watch(), name=f"remote-health:{self.served_model}"
            )

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.remote.health_interval_s)
            try:
                await asyncio.gather(*(self._health_check(b) for b in self._due()))
            except Exception:  # the timer keeps going whatever one round met
                logger.exception("remote judge health checks failed")

    @property
    def available(self) -> bool:
        return any(b.state == "up" for b in self.backends)

    def _choose(self, tried: set[str]) -> Backend | None:
        """The backend for a call: the request's own (rendezvous hashing of ``REQUEST_AFFINITY``
        over the healthy backends not yet tried), unless it is more than ``affinity_max_skew`` calls
        busier than the least busy one; without a key, the least busy."""
        self.refresh()
        up = [b for b in self.backends if b.state == "up"]
        usable = [b for b in up if b.url not in tried] or up  # tried them all: any up one again
        if not usable:
            return None
        least = min(usable, key=lambda b: (b.inflight, random.random()))
        key = REQUEST_AFFINITY.get() if self.remote.affinity else None
        if key is None:
            return least
        chosen = max(usable, key=lambda b: _weight(key, b.url))
        if chosen.inflight - least.inflight > self.remote.affinity_max_skew:
            return least
        return chosen

    async def _health_check(self, b: Backend) -> None:
        try:
            try:
                r = await b.client.get("/health", timeout=5.0)
                if r.status_code == 404:
                    r = await b.client.get("/v1/models", timeout=5.0)
                ok = r.status_code == 200
                why = f"health check answered {r.status_code}"
            except httpx.HTTPError as exc:
                ok, why = False, f"health check failed: {exc!r}"
            if ok:
                b.state, b.failures, b.last_error = "up", 0, None
                BACKEND_UP.labels(self.served_model, b.url).set(1)
                logger.info("remote judge backend %s is back", b.url)
            else:
                b.open_until, b.last_error = time.monotonic() + self.remote.open_s, why
        finally:
            b.checking = False

    def _failed(self, b: Backend, error: str) -> None:
        b.failures += 1
        b.failed += 1
        b.last_error = error
        CALLS.labels(self.served_model, b.url, "retryable").inc()
        if b.failures >= self.remote.failures_to_open and b.state == "up":
            b.state, b.open_until = "out", time.monotonic() + self.remote.open_s
            BACKEND_UP.labels(self.served_model, b.url).set(0)
            logger.warning("remote judge backend %s is out for %.0fs: %s", b.url, self.remote.open_s, error)

    async def _post(self, path: str, body: dict, tokens: int) -> dict:
        """POST to one backend after another until one answers, within ``retries`` further tries."""
        if self._requests is not None:
            await self._requests.take(1)
        if self._tokens is not None:
            await self._tokens.take(tokens)
        tried: set[str] = set()
        errors: list[str] = []
        for attempt in range(self.remote.retries + 1):
            b = self._choose(tried)
            if b is None:
                # every backend is out: wait for a health check once, within this call's tries
                await asyncio.sleep(self.remote.backoff_s * (2**attempt))
                b = self._choose(tried)
                if b is None:
                    states = "; ".join(f"{x.url}: {x.state} ({x.last_error})" for x in self.backends)
                    raise BackendsUnavailable(f"every backend of {self.served_model!r} is out: {states}")
            tried.add(b.url)
            b.inflight += 1  # counted from the choice (waiting for a slot too): what busy means
            try:
                async with b.slots:
                    try:
                        r = await b.client.post(path, json=body)
                    except httpx.HTTPError as exc:  # connection refused or reset, timeout: retry
                        error = f"{b.url}: {exc.__class__.__name__}: {exc}"
                        self._failed(b, error)
                        errors.append(error)
                        r = None
            finally:
                b.inflight -= 1
            if r is not None:
                if r.status_code < 400:
                    b.failures = 0
                    b.answered += 1
                    CALLS.labels(self.served_model, b.url, "answered").inc()
                    return r.json()
                text = r.text[:300]
                if r.status_code not in _RETRYABLE and r.status_code < 500:
                    CALLS.labels(self.served_model, b.url, "refused").inc()
                    raise BackendRefused(f"the judge's server refused the request ({r.status_code}): {text}")
                error = f"{b.url}: {r.status_code} {text}"
                self._failed(b, error)
                errors.append(error)
                wait = _retry_after(r)
            else:
                wait = None
            if attempt < self.remote.retries:
                self.retried += 1
                delay = self.remote.backoff_s * (2**attempt) * (0.5 + random.random())
                await asyncio.sleep(max(delay, wait or 0.0))
        raise BackendsUnavailable(
            f"the judge's servers failed {len(errors)} tries: " + "; ".join(errors[-3:])
        )

    def _common(self, priority: int, cache_salt: str | None) -> dict:
        body: dict = {"model": self.served_model}
        if self._priorities:
            body["priority"] = priority
        if cache_salt is not None and self.remote.cache_salt:
            body["cache_salt"] = cache_salt
        return body

    # ------------------------------------------------------------ what the judges call

    def chat_ids(
        self, messages: list[dict], *, generation_prompt: bool, images: list | None = None
    ) -> list[int]:
        ids = super().chat_ids(messages, generation_prompt=generation_prompt, images=images)
        if self.remote.api != "chat":
            return ids
        # the contents as the judge's templates built them (every judged text defused)
        return ChatPrompt(ids, [{"role": m["role"], "content": m.get("content")} for m in messages])

    async def complete(
        self,
        token_ids: list[int],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        top_logprobs: int | None = None,
        seed: int | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        images: list | None = None,
    ) -> Completion:
        if images:
            raise ValueError("remote judges take no images")
        if self.remote.api == "chat":
            return await self._complete_chat(
                token_ids, max_tokens=max_tokens, temperature=temperature, top_logprobs=top_logprobs,
                seed=seed, priority=priority, cache_salt=cache_salt,
            )  # fmt: skip
        body = {
            **self._common(priority, cache_salt),
            "prompt": list(token_ids),
            "max_tokens": max_tokens,
            "temperature": temperature,
            "return_tokens_as_token_ids": True,
        }
        if top_logprobs:
            body["logprobs"] = top_logprobs
        if seed is not None:
            body["seed"] = seed
        out = await self._post("/v1/completions", body, len(token_ids) + max_tokens)
        choice = out["choices"][0]
        first: dict[int, float] = {}
        logprobs = choice.get("logprobs") or {}
        tops = logprobs.get("top_logprobs") or []
        if top_logprobs and tops:
            first = {_token_id(t): lp for t, lp in (tops[0] or {}).items()}
        usage = out.get("usage") or {}
        return Completion(
            text=choice.get("text", ""),
            first_token_logprobs=first,
            prompt_tokens=usage.get("prompt_tokens", len(token_ids)),
            completion_tokens=usage.get("completion_tokens", 0),
            finish_reason=choice.get("finish_reason"),
        )

    async def _complete_chat(
        self, prompt, *, max_tokens, temperature, top_logprobs, seed, priority, cache_salt
    ) -> Completion:
        messages = getattr(prompt, "messages", None)
        if messages is None:
            raise BackendRefused("a chat-api judge sends chat messages; this call has token ids only")
        body = {
            **self._common(priority, cache_salt),
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if top_logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = top_logprobs
        if seed is not None:
            body["seed"] = seed
        out = await self._post("/v1/chat/completions", body, len(prompt) + max_tokens)
        choice = out["choices"][0]
        first: dict[int, float] = {}
        content = (choice.get("logprobs") or {}).get("content") or []
        if top_logprobs and content:
            for entry in content[0].get("top_logprobs") or []:
                tid = self._id_of_text(entry.get("token") or "")
                if tid is not None and tid not in first:  # the likelier of two texts of one id
                    first[tid] = float(entry["logprob"])
        usage = out.get("usage") or {}
        return Completion(
            text=(choice.get("message") or {}).get("content") or "",
            first_token_logprobs=first,
            prompt_tokens=usage.get("prompt_tokens", len(prompt)),
            completion_tokens=usage.get("completion_tokens", 0),
            finish_reason=choice.get("finish_reason"),
        )

    def _id_of_text(self, text: str) -> int | None:
        """A chat backend names its top tokens by text: the id of the one token of the judge's
        tokenizer that text is (a label's text is its label token's), None for any other text."""
        if text not in self._text_ids:
            self._text_ids[text] = self.single_token_id(text) if text else None
        return self._text_ids[text]

    async def classify(
        self,
        token_ids: list[int],
        *,
        activation: bool = False,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> float:
        outputs = await self._classify(token_ids, activation, priority, cache_salt)
        if len(outputs) != 1:
            raise ValueError(f"the classifier returned {len(outputs)} outputs; a reward model has one label")
        return outputs[0]

    async def classify_all(
        self, token_ids: list[int], *, priority: int = 0, cache_salt: str | None = None
    ) -> list[float]:
        return await self._classify(token_ids, False, priority, cache_salt)

    async def _classify(self, token_ids, activation: bool, priority: int, cache_salt) -> list[float]:
        body = {**self._common(priority, cache_salt), "input": list(token_ids), "use_activation": activation}
        out = await self._post("/classify", body, len(token_ids))
        return [float(x) for x in out["data"][0]["probs"]]

    @property
    def output_labels(self) -> list[str] | None:
        return None

    async def prompt_logprobs(
        self, token_ids: list[int], *, start: int, priority: int = 0, cache_salt: str | None = None
    ) -> tuple[float, int]:
        if not 1 <= start < len(token_ids):
            raise ValueError(
                f"start={start} is out of range for {len(token_ids)} prompt tokens: it must be at least "
                "1 (the first token has no log-probability) and leave at least one token to score"
            )
        body = {
            **self._common(priority, cache_salt),
            "prompt": list(token_ids),
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": 0,
        }
        out = await self._post("/v1/completions", body, len(token_ids) + 1)
        returned = out["choices"][0].get("prompt_logprobs")
        if returned is None or len(returned) != len(token_ids):
            got = "no prompt log-probabilities" if returned is None else f"{len(returned)} positions"
            raise ValueError(f"the judge's server returned {got} for a prompt of {len(token_ids)} tokens")
        total = 0.0
        for pos in range(start, len(token_ids)):
            entry = returned[pos] or {}
            found = entry.get(str(token_ids[pos])) or entry.get(token_ids[pos])
            if found is None:
                raise ValueError(f"the judge's server returned no log-probability for prompt token {pos}")
            total += found["logprob"] if isinstance(found, dict) else float(found)
        return total, len(token_ids) - start

    async def generate_stream(self, *args, **kwargs):
        raise BackendRefused("a remote judge serves the judging routes only, not /v1 generation")
        yield  # pragma: no cover  (an async generator)

    async def embed(self, *args, **kwargs):
        raise BackendRefused("a remote judge has no embeddings")

    @property
    def dead(self) -> bool:
        return False  # a backend that fails is taken out; the server stays up

    def shutdown(self) -> None:
        if (worker := self.__dict__.get("_tokenizing")) is not None:
            worker.shutdown()
        for task in [self._watching, *self._checks]:  # the health-check timer and checks under way
            if task is None or task.done():
                continue
            try:
                here = asyncio.get_running_loop() is task.get_loop()
            except RuntimeError:
                here = False
            if here:
                task.cancel()
            else:  # from another thread: on the task's own loop, if that still runs
                with contextlib.suppress(RuntimeError):
                    task.get_loop().call_soon_threadsafe(task.cancel)
        for b in self.backends:
            with contextlib.suppress(RuntimeError):  # no loop running: the clients go with the process
                asyncio.get_running_loop().create_task(b.client.aclose())


_CHAT_CANNOT = {
    "classifier": "a classifier's scores come from its classification head over token ids (/classify)",
    "followup": "a follow-up judge reads the log-probabilities of prompt tokens, which chat completions "
    "do not return",
    "prm": "a process reward model's step scores come from a pooling model over token ids",
    "clip": "a clip judge embeds images and texts",
}


def chat_refusal(kind: str) -> str:
    """Why a judge of ``kind`` cannot use ``engine.remote.api: chat`` (only generative judges can)."""
    why = _CHAT_CANNOT.get(kind, f"a {kind} judge needs more than generated text")
    return (
        f"a {kind} judge cannot use engine.remote.api: chat: chat completions return generated text "
        f"and its top log-probabilities only, and {why}; use api: completions with a vLLM or "
        "SGLang server"
    )


def _weight(key: str, url: str) -> int:
    """Rendezvous hashing: a request's weight for a backend; the heaviest up backend is its own.
    The same on every replica (no per-process salt), so replicas route a key alike."""
    return int.from_bytes(hashlib.blake2b(f"{key}\0{url}".encode(), digest_size=8).digest(), "big")


def _token_id(token: str) -> int:
    """vLLM's ``return_tokens_as_token_ids`` names a token ``token_id:<id>``."""
    if token.startswith("token_id:"):
        return int(token.removeprefix("token_id:"))
    raise ValueError(f"the judge's server named a token {token!r}, not by id (return_tokens_as_token_ids)")


def _retry_after(r: httpx.Response) -> float | None:
    try:
        return min(30.0, float(r.headers.get("retry-after", "")))
    except ValueError:
        return None
