"""HTTP clients: ``Referee`` (sync) and ``AsyncReferee`` (async), with the same methods.

Exceptions, all under ``RefereeError``::

    RefereeError
    ├── TransportError        the server could not be reached, or did not answer in time
    │   ├── RefereeTimeout
    │   └── QueueUnavailable  (queue) Redis unreachable or refusing commands, past the retries
    ├── StepRewardError       step_rewards: the judge answered without step scores for the response
    └── APIError              the server answered with an error status (``.status``, ``.code``)
        ├── AuthenticationError  401: no API key, or one the server does not know (never retried)
        ├── PermissionDenied  403: the key is valid but may not do this (never retried)
        ├── BadRequest        400/413/422: change the request (``.message`` says how)
        │   └── UnknownJudge  404: no judge of that name is loaded
        ├── Overloaded        429: too much in flight; retried with backoff before it is raised
        │   └── BacklogFull   (queue) the job's stream is at its cap: wait for answers first
        └── Unavailable       503 (judges loading) and 5xx; retried before it is raised

Retries (connection errors, 429, 503) use jittered exponential backoff and honour ``Retry-After``.
Each request carries an ``Idempotency-Key`` that stays the same across its retries.

Keys: a server with tenants wants ``Authorization: Bearer <key>`` on every call. ``api_key``
defaults to ``$REFEREE_API_KEY``; ``job_id`` (header ``X-Referee-Job``) names the training job
within the tenant, so the server shares the tenant's capacity fairly between its jobs. The key never
appears in a client's repr nor in the SDK's exception messages and logs.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from .auth import key_from_env, tenant_of
from .defaults import DEFAULT_URL
from .health import HealthReport
from .images import as_content, image_bytes
from .protocol import (
    STEP_DELIMITER,
    BlobInfo,
    ImagePart,
    JudgeRequest,
    JudgeResponse,
    JudgesResponse,
    PairwiseRequest,
    PairwiseResponse,
    Prompt,
    ScoreRequest,
    ScoreResponse,
    Steps,
    WinRateRequest,
    WinRateResponse,
)
from .steps import StepReward, check_tokens, dense_rewards, step_request, step_reward

T = TypeVar("T", bound=BaseModel)

DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=300.0, write=30.0, pool=30.0)


class RefereeError(Exception):
    """Base of every error the SDK raises."""


class TransportError(RefereeError):
    pass


class RefereeTimeout(TransportError):
    pass


class QueueUnavailable(TransportError):
    """Redis could not be reached (or refused the command) within the request's timeout."""


class StepRewardError(RefereeError, ValueError):
    """The judge answered, but with no step scores for the response: the item's error, or a judge
    that is not a process reward model (kind ``prm``)."""


class APIError(RefereeError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class AuthenticationError(APIError):
    """401: the request had no API key, or a key the server does not know (or no longer knows)."""


class PermissionDenied(APIError):
    """403: the key is valid, but its tenant may not do this."""


class BadRequest(APIError):
    pass


class UnknownJudge(BadRequest):
    pass


class Overloaded(APIError):
    pass


class BacklogFull(Overloaded):
    """A job's request stream holds as many messages as its cap allows (code ``backlog_full``)."""


class Unavailable(APIError):
    pass


def _api_error(response: httpx.Response, secret: str | None = None) -> APIError:
    try:
        body = response.json()
        code, message = body.get("error", "error"), body.get("message", response.text)
    except ValueError:
        code, message = "error", response.text
    return api_error(response.status_code, str(code), redact(str(message), secret))


def api_error(status: int, code: str, message: str) -> APIError:
    """The exception for an error answer, whether it came over HTTP or through the queue."""
    if status == 401:
        return AuthenticationError(status, code, message)
    if status == 403:
        return PermissionDenied(status, code, message)
    if status == 404:
        return UnknownJudge(status, code, message)
    if status == 429:
        return Overloaded(status, code, message)
    if status >= 500:
        return Unavailable(status, code, message)
    return BadRequest(status, code, message)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    backoff: float = 0.5
    max_backoff: float = 20.0

    def delay(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None and (after := response.headers.get("Retry-After")):
            try:
                return min(float(after), self.max_backoff) * (1.0 + 0.1 * random.random())
            except ValueError:
                pass
        return min(self.backoff * 2**attempt, self.max_backoff) * (0.5 + random.random())


def _retryable(response: httpx.Response) -> bool:
    return response.status_code in (429, 502, 503, 504)


_PATH_TOKEN = re.compile(r"/k/[^/?#]+")


def redact(text: str, secret: str | None = None) -> str:
    """``text`` without ``secret`` and without the key of a ``/k/<key>/`` URL path."""
    if secret:
        text = text.replace(secret, "***")
    return _PATH_TOKEN.sub("/k/***", text)


def mask_key(key: str | None) -> str | None:
    """What may be shown of a key: its tenant (``rk.team-a.***``), never the secret part."""
    if not key:
        return None
    tenant = tenant_of(key)
    return f"rk.{tenant}.***" if tenant else "***"


def auth_headers(api_key: str | None, job_id: str | None) -> dict[str, str]:
    headers = {}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    if job_id:
        headers["X-Referee-Job"] = job_id
    return headers


def _request_args(body: BaseModel | None, timeout: float | None = None) -> dict[str, Any]:
    headers = {"Idempotency-Key": uuid.uuid4().hex}
    if timeout:  # the server stops working on the request when this client would stop waiting
        headers["X-Request-Timeout"] = f"{timeout:g}"
    if body is None:
        return {"headers": headers}
    # Only what the caller set: a server of an older version, which lacks a newer option, still
    # answers a request that leaves that option at its default.
    return {"headers": headers, "json": body.model_dump(mode="json", exclude_none=True, exclude_unset=True)}


def _report_args(client, job: str | None, judge: str | None, all_jobs: bool, tenant: str | None) -> dict:
    params = {} if tenant is None else {"tenant": tenant}
    job = None if all_jobs else (job or client.job_id or "default")
    if job is not None:
        params["job"] = job
    if judge is not None:
        params["judge"] = judge
    return {"params": params}


_CONTENT_FIELDS = ("prompt", "response", "response_a", "response_b")


def _media(fields: dict) -> dict:
    """Image sources (PIL images, arrays, bytes, paths) where content goes become image parts."""
    out = dict(fields)
    for name in _CONTENT_FIELDS:
        if name in out:
            out[name] = as_content(out[name])
    if isinstance(out.get("responses"), list):
        out["responses"] = [as_content(r) for r in out["responses"]]
    if isinstance(out.get("items"), list):
        out["items"] = [_media(it) if isinstance(it, dict) else it for it in out["items"]]
    return out


def _build(model: type[T], request: T | None, fields: dict) -> T:
    if request is not None:
        return request
    return model(**_media({k: v for k, v in fields.items() if v is not None}))


def _upload_args(source: Any, timeout: float | None) -> dict[str, Any]:
    args = _request_args(None, timeout)
    args["content"] = image_bytes(source)
    args["headers"]["Content-Type"] = "application/octet-stream"
    return args


class _Base:
    def __init__(
        self, base_url: str, retry: RetryPolicy | None, api_key: str | None, job_id: str | None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self._api_key = key_from_env(api_key)
        self.job_id = job_id
        # A key given in the URL's path (``/k/<key>``) is a secret as well.
        self._secret = self._api_key
        if self._secret is None and (m := _PATH_TOKEN.search(self.base_url)):
            self._secret = m.group(0)[3:]

    @property
    def _headers(self) -> dict[str, str]:
        return auth_headers(self._api_key, self.job_id)

    @property
    def url(self) -> str:
        """The base URL as it may be shown (a ``/k/<key>`` path token masked)."""
        return redact(self.base_url, self._secret)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.url!r}, api_key={mask_key(self._api_key)!r}, "
            f"job_id={self.job_id!r})"
        )

    def _settle(
        self, what: str, attempt: int, response: httpx.Response | None, exc: Exception | None, out: type[T]
    ) -> T | float:
        """One attempt's outcome: the parsed answer, or the delay before the next attempt (or raise)."""
        last = attempt + 1 == self.retry.attempts
        if isinstance(exc, httpx.TimeoutException):
            raise RefereeTimeout(redact(f"{what} timed out: {exc}", self._secret)) from exc
        if exc is not None:
            if last:
                raise TransportError(
                    redact(f"{what}: cannot reach {self.base_url}: {exc}", self._secret)
                ) from exc
            return self.retry.delay(attempt, None)
        assert response is not None
        if response.is_success:
            return out.model_validate(response.json())
        if not _retryable(response) or last:
            raise _api_error(response, self._secret)
        return self.retry.delay(attempt, response)


class Referee(_Base):
    """Synchronous client. ``with Referee(url) as ref: ref.winrate(prompt=..., responses=[...])``.

    ``api_key`` (default ``$REFEREE_API_KEY``) and ``job_id`` go with every request as
    ``Authorization: Bearer`` and ``X-Referee-Job``.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        api_key: str | None = None,
        job_id: str | None = None,
    ) -> None:
        super().__init__(base_url, retry, api_key, job_id)
        self._http = httpx.Client(
            base_url=self.base_url, timeout=timeout, transport=transport, headers=self._headers
        )

    def _call(self, method: str, path: str, body: BaseModel | None, out: type[T], args=None) -> T:
        args = args or _request_args(body, self._http.timeout.read)
        for attempt in range(self.retry.attempts):
            response = error = None
            try:
                response = self._http.request(method, path, **args)
            except httpx.TransportError as exc:
                error = exc
            result = self._settle(f"{method} {path}", attempt, response, error, out)
            if not isinstance(result, float):
                return result
            time.sleep(result)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def score(self, request: ScoreRequest | None = None, **fields) -> ScoreResponse:
        return self._call("POST", "/score", _build(ScoreRequest, request, fields), ScoreResponse)

    def upload(self, source: Any) -> ImagePart:
        """Send an image once (``POST /blobs``); the returned part references it in later requests."""
        info = self._call("POST", "/blobs", None, BlobInfo, _upload_args(source, self._http.timeout.read))
        return ImagePart(blob=info.id)

    def pairwise(self, request: PairwiseRequest | None = None, **fields) -> PairwiseResponse:
        return self._call("POST", "/pairwise", _build(PairwiseRequest, request, fields), PairwiseResponse)

    def judge(self, request: JudgeRequest | None = None, **fields) -> JudgeResponse:
        return self._call("POST", "/judge", _build(JudgeRequest, request, fields), JudgeResponse)

    def winrate(self, request: WinRateRequest | None = None, **fields) -> WinRateResponse:
        return self._call("POST", "/winrate", _build(WinRateRequest, request, fields), WinRateResponse)

    def judges(self) -> JudgesResponse:
        return self._call("GET", "/judges", None, JudgesResponse)

    def step_rewards(
        self,
        prompt: Prompt,
        response: str | Sequence[str] | Steps,
        *,
        judge: str | None = None,
        aggregate: str | None = None,
    ) -> StepReward:
        """A process reward model's scores of one response's steps (``/score``): ``response`` is text
        (split on the judge's ``step_delimiter``) or a list of steps (scored as given). Returns
        ``StepReward`` (step_scores, step_spans, aggregate); ``StepRewardError`` when the judge gives
        no step scores for it (an item error, or a judge that is not kind prm)."""
        return step_reward(self.score(step_request(prompt, response, judge=judge, aggregate=aggregate)))

    def token_rewards(
        self,
        prompt: Prompt,
        response: str | Sequence[str] | Steps,
        *,
        offsets: Sequence[Sequence[int]] | None = None,
        tokenizer: Any = None,
        judge: str | None = None,
        aggregate: str | None = None,
        delimiter: str = STEP_DELIMITER,
    ) -> list[float]:
        """Dense rewards: one value per response token, each step's score on the step's last token
        and 0 elsewhere (``referee.steps``). Tokens are given by their ``offsets`` in the response
        text (a list of steps: the steps joined with ``delimiter``), or cut by ``tokenizer``."""
        check_tokens(offsets, tokenizer)
        reward = self.step_rewards(prompt, response, judge=judge, aggregate=aggregate)
        return dense_rewards(reward, response, offsets=offsets, tokenizer=tokenizer, delimiter=delimiter)

    def report(
        self,
        job: str | None = None,
        *,
        judge: str | None = None,
        all_jobs: bool = False,
        tenant: str | None = None,
    ) -> HealthReport:
        """What the judge gave a job (``GET /report``): figures per judge and window, and warnings
        when the reward looks empty or biased (``referee.health``). Default: this client's job
        (``job_id``); ``all_jobs``: every recent job of this tenant together; ``tenant``: another
        tenant's (operators only)."""
        return self._call(
            "GET", "/report", None, HealthReport, _report_args(self, job, judge, all_jobs, tenant)
        )

    def health(self) -> bool:
        """True when the judges are loaded and answering (``GET /readyz``)."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Referee:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncReferee(_Base):
    """Asynchronous client with the methods of ``Referee``; use it to keep many questions in flight."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 256,
        api_key: str | None = None,
        job_id: str | None = None,
    ) -> None:
        super().__init__(base_url, retry, api_key, job_id)
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, transport=transport, limits=limits, headers=self._headers
        )

    async def _call(self, method: str, path: str, body: BaseModel | None, out: type[T], args=None) -> T:
        args = args or _request_args(body, self._http.timeout.read)
        for attempt in range(self.retry.attempts):
            response = error = None
            try:
                response = await self._http.request(method, path, **args)
            except httpx.TransportError as exc:
                error = exc
            result = self._settle(f"{method} {path}", attempt, response, error, out)
            if not isinstance(result, float):
                return result
            await asyncio.sleep(result)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def score(self, request: ScoreRequest | None = None, **fields) -> ScoreResponse:
        return await self._call("POST", "/score", _build(ScoreRequest, request, fields), ScoreResponse)

    async def upload(self, source: Any) -> ImagePart:
        """Send an image once (``POST /blobs``); the returned part references it in later requests."""
        args = _upload_args(source, self._http.timeout.read)
        info = await self._call("POST", "/blobs", None, BlobInfo, args)
        return ImagePart(blob=info.id)

    async def pairwise(self, request: PairwiseRequest | None = None, **fields) -> PairwiseResponse:
        return await self._call(
            "POST", "/pairwise", _build(PairwiseRequest, request, fields), PairwiseResponse
        )

    async def judge(self, request: JudgeRequest | None = None, **fields) -> JudgeResponse:
        return await self._call("POST", "/judge", _build(JudgeRequest, request, fields), JudgeResponse)

    async def winrate(self, request: WinRateRequest | None = None, **fields) -> WinRateResponse:
        return await self._call("POST", "/winrate", _build(WinRateRequest, request, fields), WinRateResponse)

    async def judges(self) -> JudgesResponse:
        return await self._call("GET", "/judges", None, JudgesResponse)

    async def step_rewards(
        self,
        prompt: Prompt,
        response: str | Sequence[str] | Steps,
        *,
        judge: str | None = None,
        aggregate: str | None = None,
    ) -> StepReward:
        """``Referee.step_rewards``."""
        answer = await self.score(step_request(prompt, response, judge=judge, aggregate=aggregate))
        return step_reward(answer)

    async def token_rewards(
        self,
        prompt: Prompt,
        response: str | Sequence[str] | Steps,
        *,
        offsets: Sequence[Sequence[int]] | None = None,
        tokenizer: Any = None,
        judge: str | None = None,
        aggregate: str | None = None,
        delimiter: str = STEP_DELIMITER,
    ) -> list[float]:
        """``Referee.token_rewards``."""
        check_tokens(offsets, tokenizer)
        reward = await self.step_rewards(prompt, response, judge=judge, aggregate=aggregate)
        return dense_rewards(reward, response, offsets=offsets, tokenizer=tokenizer, delimiter=delimiter)

    async def report(
        self,
        job: str | None = None,
        *,
        judge: str | None = None,
        all_jobs: bool = False,
        tenant: str | None = None,
    ) -> HealthReport:
        """``Referee.report``."""
        return await self._call(
            "GET", "/report", None, HealthReport, _report_args(self, job, judge, all_jobs, tenant)
        )

    async def health(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncReferee:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
