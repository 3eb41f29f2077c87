"""What an engine answers and how it fails, without vLLM: the judges import these, and
``engine`` (the one module that imports vLLM) re-exports them."""

from __future__ import annotations

from dataclasses import dataclass, field


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
