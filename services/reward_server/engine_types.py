"""What an engine answers and how it fails, without vLLM: the judges import these, and
``engine`` (the one module that imports vLLM) re-exports them."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field

# The request a call to an engine is made for (set by the service once per question it runs; tasks
# a request starts inherit it): a remote judge keeps one request's calls on one backend, so that a
# group's comparisons, which share their prompt, reuse that backend's prefix cache.
REQUEST_AFFINITY: ContextVar[str | None] = ContextVar("referee_request_affinity", default=None)


@dataclass
class Completion:
    """One generation: its text and the first generated token's top log-probabilities by token id."""

    text: str
    first_token_logprobs: dict[int, float] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None


class EngineDead(RuntimeError):
    """The engine's core process is gone: nothing more can be judged by this server process.

    Not a per-item outcome: the request fails with 503 and the server exits so that its supervisor
    (compose, Kubernetes) starts a fresh one."""


class BackendsUnavailable(RuntimeError):
    """Every remote backend of a judge is out (down, or its circuit open): the request fails with
    503 and a reason, never as a value; this server stays up, and the judge answers again once a
    backend passes its health check."""


# What a judge never turns into one item's error: the whole request fails.
NOT_PER_ITEM = (EngineDead, BackendsUnavailable)
