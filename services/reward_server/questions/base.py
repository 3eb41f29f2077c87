"""The question shape every route fills in, and content normalised once for every kind."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel

from referee.protocol import (
    Steps,
    TextPart,
    Usage,
    content_text,
)

from ..errors import ClientError
from ..judges import Judge, RequestContext

Texts = Iterable[tuple[str, str]]


# ---------------------------------------------------------------- content, once for every kind


def normalise(value: Any) -> Any:
    """Content as the judge kinds expect it: a list of parts that holds only text becomes that
    text (what a client meant by ``[{"type": "text", "text": T}]`` is ``T``), whatever model,
    message or list it sits in. Content with images stays a list of parts. Returns a copy where
    anything changed; the caller's objects are left as they were."""
    if isinstance(value, list):
        if value and all(isinstance(p, TextPart) for p in value):
            return "".join(p.text for p in value)
        items = [normalise(v) for v in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    if isinstance(value, BaseModel):
        changed = {}
        for name in type(value).model_fields:
            old = getattr(value, name)
            new = normalise(old)
            if new is not old:
                changed[name] = new
        return value.model_copy(update=changed) if changed else value
    return value


def prompt_texts(where: str, prompt) -> list[tuple[str, str]]:
    """(where, text) of a prompt: the text, or each chat message's text."""
    if isinstance(prompt, str):
        return [(where, prompt)]
    return [(f"{where}[{k}].content", content_text(m.content or "")) for k, m in enumerate(prompt)]


def item_contents(where: str, item) -> list[tuple[str, object]]:
    """(where, content) of an item's prompt and responses, for media and the kind's checks (a
    response given as steps holds text only: no media)."""
    fields = ("prompt", "response", "response_a", "response_b", "reference")
    return [
        (f"{where}.{f}", getattr(item, f))
        for f in fields
        if getattr(item, f, None) is not None and not isinstance(getattr(item, f), Steps)
    ]


def _check_steps(judge: Judge, judged: Iterable[tuple[str, Any, Any]]) -> None:
    """A response given as a list of steps is for a process reward model only (422 naming it)."""
    if judge.kind == "prm":
        return
    for where, _, response in judged:
        if isinstance(response, Steps):
            raise ClientError(
                422,
                "unsupported_input",
                f"{where} is given as a list of steps, which only a process reward model (kind prm) "
                f"scores; judge {judge.name!r} is a {judge.kind} judge: give the response as text",
            )


def _options(make, req) -> dict:
    try:
        return make(req)
    except ValueError as exc:
        raise ClientError(400, "bad_request", str(exc)) from None


@dataclass
class Cost:
    """Worst-case engine requests of a question: units x per_unit x attempts."""

    units: int
    per_unit: int = 1
    attempts: int = 1  # 1 + max_retries for reasoning judges

    @property
    def engine_requests(self) -> int:
        return self.units * self.per_unit * self.attempts


@dataclass
class Outcome:
    """What the metrics count of an answered question."""

    items: int
    errors: int
    verdicts: list[str] = field(default_factory=list)


class Question:
    """One request as the pipeline sees it. Subclasses fill in the parts that differ by route."""

    route: ClassVar[str]  # the metrics' route label, and what the judge must serve (``Judge.routes``)
    request: Any

    def __init__(self, request) -> None:
        self.request = request

    # -- what it needs
    @property
    def judge_name(self) -> str | None:
        return getattr(self.request, "judge", None)

    @property
    def cache(self) -> bool | None:
        """The request's choice of the judgment cache (None: the server's default)."""
        return getattr(self.request, "cache", None)

    def choose(self, service) -> Judge:
        return service.judge_for(self.judge_name, self.route)

    def normalise(self) -> None:
        self.request = normalise(self.request)

    def items(self) -> int:
        """Items (or compared units) of the request, checked against ``limits.max_items``."""
        return len(self.request.items)

    def group_size(self) -> int | None:
        """Responses of a group, checked against ``limits.max_group_size`` (None: no group)."""
        return None

    def prompts(self) -> Iterable[tuple[str, Any]]:
        """(where, prompt) of every prompt: conversations are checked against ``limits.max_messages``."""
        return ((f"items[{k}].prompt", it.prompt) for k, it in enumerate(self.request.items))

    def texts(self) -> Texts:
        """(where, text) of every text the judge will read besides the prompts."""
        rubric = getattr(self.request, "rubric", None)
        return [("rubric", rubric)] if rubric is not None else []

    def contents(self) -> Iterable[tuple[str, object]]:
        """(where, content) of everything that may hold images."""
        return (x for k, it in enumerate(self.request.items) for x in item_contents(f"items[{k}]", it))

    def judged(self) -> Iterable[tuple[str, Any, Any]]:
        """(where, prompt, response) for the judge kind's own checks (``Judge.validate``)."""
        return ()

    def generation(self) -> tuple[int | None, int, int]:
        """(max_new_tokens, max_retries, samples) asked for; checked against the limits."""
        req = self.request
        return (
            getattr(req, "max_new_tokens", None),
            getattr(req, "max_retries", 0),
            getattr(req, "samples", 1),
        )

    def check(self, limits) -> None:
        """The route's own limits (``settings.Limits``), beyond those every question has (ClientError)."""

    def prepare(self, judge: Judge) -> None:
        """The route's own checks against the chosen judge (ClientError), before anything is spent."""

    def cost(self, judge: Judge) -> Cost:
        raise NotImplementedError

    # -- how it runs
    async def run(self, judge: Judge, ctx: RequestContext) -> Any:
        raise NotImplementedError

    def outcome(self, result, answer) -> Outcome:
        raise NotImplementedError

    def answer(self, judge: Judge, result, usage: Usage) -> Any:
        raise NotImplementedError


def _check_mode(judge: Judge, mode: str) -> None:
    if mode not in judge.pairwise_modes:
        raise ClientError(
            400,
            "unsupported",
            f"judge {judge.name!r} ({judge.kind}) cannot judge with mode={mode!r}; "
            f"use one of {list(judge.pairwise_modes)} or a generative judge",
        )


def _attempts(mode: str, max_retries: int, samples: int = 1) -> int:
    """Generations per comparison or rating at worst: each sample with its retries (cot only)."""
    return (1 + max_retries) * samples if mode == "cot" else 1


def _check_samples(req, mode: str) -> None:
    if getattr(req, "samples", 1) > 1 and mode != "cot":
        raise ClientError(
            400,
            "bad_request",
            f"samples={req.samples} needs mode=cot (a logprob verdict is a probability, not a sample)",
        )
