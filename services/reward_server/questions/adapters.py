"""The questions only adapters ask: formatted text (vLLM's /classify, OpenRLHF's /get_reward) and
free generation (the OpenAI face)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from referee.protocol import (
    Message,
    TextPart,
    Usage,
)

from ..errors import ClientError
from ..judges import Judge, Rating, RequestContext
from ..tokens import image_marker
from .base import Cost, Outcome, Question, Texts, normalise

# ---------------------------------------------------------------- formatted text (/classify, /get_reward)


def _lstrip_all(text: str, prefix: str | None) -> str:
    while prefix and text.startswith(prefix):
        text = text[len(prefix) :]
    return text


def split_queries(
    queries: list[str], prompts: list[str] | None, bos: str | None = None
) -> list[tuple[str, str]]:
    """(prompt, response) of each query. Leading BOS texts are not compared: OpenRLHF's decoded
    query carries a BOS more than the prompt when the tokenizer added one to a templated prompt."""
    if prompts is None:
        raise ClientError(
            422, "invalid_request", "a generative judge needs `prompts` to tell prompt from response"
        )
    if len(prompts) != len(queries):
        raise ClientError(422, "invalid_request", f"{len(queries)} queries but {len(prompts)} prompts")
    pairs = []
    for k, (query, prompt) in enumerate(zip(queries, prompts, strict=True)):
        bare_query, bare_prompt = _lstrip_all(query, bos), _lstrip_all(prompt, bos)
        if not bare_query.startswith(bare_prompt):
            raise ClientError(422, "invalid_request", f"query[{k}] does not start with prompts[{k}]")
        cut = len(query) - len(bare_query) + len(bare_prompt)
        pairs.append((query[:cut], query[cut:]))
    return pairs


@dataclass
class ClassifyAnswer:
    judge: Judge
    ratings: list[Rating]
    usage: Usage


class ClassifyQuestion(Question):
    """Scores of text already in the model's own format (vLLM's ``/classify`` input, OpenRLHF's
    queries: their special tokens are the client's template), or of one conversation in the
    model's chat template. With ``prompts`` (OpenRLHF's), each text is split into its prompt part,
    the client's template, and its response part, user data never parsed for special tokens.
    Needs a judge with the ``formatted_text`` ability."""

    route = "classify"

    def __init__(
        self,
        *,
        judge: str | None,
        texts: list[str] | None = None,
        prompts: list[str] | None = None,
        messages: list[Message] | None = None,
        activation: bool | None = None,
        add_special_tokens: bool = True,
        cache: bool | None = None,
        where: str = "input",
        by_model: bool = False,
    ) -> None:
        if (texts is None) == (messages is None):
            raise ValueError("a classify question has texts or messages")
        self._judge, self._cache, self.where, self.by_model = judge, cache, where, by_model
        self.texts_in, self.prompt_parts, self.responses = texts, prompts, None
        self.messages, self.activation, self.add_special_tokens = messages, activation, add_special_tokens
        self.request = None

    @property
    def judge_name(self) -> str | None:
        return self._judge

    @property
    def cache(self) -> bool | None:
        return self._cache

    def choose(self, service) -> Judge:
        name = self._judge
        if self.by_model and name is not None and name not in service.judges:
            # vLLM's clients name the model: accept a judge's configured model too
            name = next((n for n, j in service.judges.items() if j.settings.model == name), name)
        judge = service.judge_for(name, "score")
        if "formatted_text" not in judge.abilities:
            raise ClientError(
                400,
                "unsupported",
                f"judge {judge.name!r} ({judge.kind}) cannot score formatted text; this route needs a "
                "classifier (a reward model) judge",
            )
        return judge

    def normalise(self) -> None:
        if self.messages is not None:
            self.messages = normalise(self.messages)

    def items(self) -> int:
        return 1 if self.texts_in is None else len(self.texts_in)

    def prompts(self):
        return [] if self.messages is None else [("messages", self.messages)]

    def texts(self) -> Texts:
        if self.texts_in is None:
            return []
        out = [(f"{self.where}[{k}]", t) for k, t in enumerate(self.texts_in)]
        if self.responses is not None:
            out += [(f"{self.where}[{k}] response", r) for k, r in enumerate(self.responses)]
        return out

    def contents(self):
        if self.messages is None:
            return []
        return [(f"messages[{k}].content", m.content) for k, m in enumerate(self.messages)]

    def generation(self) -> tuple[int | None, int]:
        return None, 0

    def prepare(self, judge: Judge) -> None:
        if self.texts_in is not None:
            # An empty text is the caller's mistake (a 4xx), not the engine's: vLLM refuses an empty
            # prompt, which would come back as a 502 that clients retry in vain.
            empty = [k for k, t in enumerate(self.texts_in) if not t]
            if empty:
                raise ClientError(
                    422, "invalid_request", f"{self.where} {empty[:10]} empty: give text to judge"
                )
        if self.prompt_parts is not None:
            bos = getattr(judge.engine.tokenizer, "bos_token", None)
            parts = split_queries(self.texts_in, self.prompt_parts, bos)
            self.texts_in, self.responses = [p for p, _ in parts], [r for _, r in parts]

    def cost(self, judge: Judge) -> Cost:
        return Cost(self.items())

    async def run(self, judge: Judge, ctx: RequestContext) -> list[Rating]:
        if self.messages is not None:
            messages = [m.model_dump() for m in self.messages]
            return [await judge.rate_messages(messages, ctx, activation=self.activation)]
        responses = self.responses or [""] * len(self.texts_in)
        return list(
            await asyncio.gather(
                *[
                    judge.rate_text(
                        t,
                        ctx,
                        activation=self.activation,
                        add_special_tokens=self.add_special_tokens,
                        response=r,
                    )
                    for t, r in zip(self.texts_in, responses, strict=True)
                ]
            )
        )

    def outcome(self, result: list[Rating], answer) -> Outcome:
        return Outcome(len(result), sum(r.score is None for r in result))

    def answer(self, judge: Judge, result, usage: Usage) -> ClassifyAnswer:
        return ClassifyAnswer(judge, result, usage)


# ---------------------------------------------------------------- free generation (the OpenAI face)


class GenerateQuestion(Question):
    """An OpenAI-style completion by a generative judge: ``messages`` in the model's chat template
    (their contents are data, images marked where they go), or a raw ``prompt`` (the client's own
    template). Admitted as ``n`` engine requests; the adapter streams or collects the outputs."""

    route = "generate"

    def __init__(self, *, model: str, params: dict, messages: list | None = None, prompt: str | None = None):
        if (messages is None) == (prompt is None):
            raise ValueError("a generate question has messages or a prompt")
        self.model, self.params, self.messages, self.prompt = model, params, messages, prompt
        self.request = None
        self.ids: list[int] = []
        self.images: list = []

    @property
    def judge_name(self) -> str | None:
        return self.model

    @property
    def cache(self) -> bool | None:
        return False  # sampled text is not a judgment to reuse

    def choose(self, service) -> Judge:
        model = self.model
        named = [
            j
            for j in service.judges.values()
            if model in (j.name, j.settings.model, getattr(j.engine, "model_path", None))
        ]
        for judge in named:  # judges sharing one model's engine: the one that chats answers
            if "chat" in judge.abilities:
                service.judge_for(judge.name, "judge")  # 503 while stopping
                return judge
        if named:
            chat = [j.name for j in service.judges.values() if "chat" in j.abilities]
            raise ClientError(
                400,
                "model_not_supported",
                f"model {model!r} is a {named[0].kind} judge; chat completions need a generative judge "
                f"({chat})",
            )
        service.judge_for(None, "judge")  # 503 while loading or stopping
        raise ClientError(404, "model_not_found", f"no model {model!r}; GET /v1/models lists them")

    def normalise(self) -> None:
        if self.messages is not None:
            self.messages = normalise(self.messages)

    def items(self) -> int:
        return self.params["n"]

    def prompts(self):
        return [] if self.messages is None else [("messages", self.messages)]

    def texts(self) -> Texts:
        return [] if self.prompt is None else [("prompt", self.prompt)]

    def contents(self):
        if self.messages is None:
            return []
        return [(f"messages[{k}].content", m.content) for k, m in enumerate(self.messages) if m.content]

    def generation(self) -> tuple[int | None, int]:
        return None, 0  # max_tokens is checked by the OpenAI adapter, in OpenAI's terms

    def check(self, limits) -> None:
        """Bounds that keep the API process responsive: vLLM checks every stop string on every
        generated token there, and every log-probability becomes a JSON object."""
        p = self.params
        if p["max_tokens"] > limits.max_new_tokens:
            raise ClientError(
                400,
                "too_large",
                f"max_tokens={p['max_tokens']} is over the limit of {limits.max_new_tokens} "
                "(limits.max_new_tokens)",
            )
        stop = p.get("stop")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > limits.max_stop_strings:
            raise ClientError(
                400,
                "too_large",
                f"`stop` has {len(stops)} strings, over the limit of {limits.max_stop_strings} "
                "(limits.max_stop_strings); send fewer",
            )
        for k, s in enumerate(stops):
            if len(s) > limits.max_stop_chars:
                raise ClientError(
                    400,
                    "too_large",
                    f"stop[{k}] has {len(s)} characters, over the limit of {limits.max_stop_chars} "
                    "(limits.max_stop_chars)",
                )
        top = p.get("logprobs")
        if top is not None:
            entries = p["n"] * p["max_tokens"] * (top + 1)
            if entries > limits.max_logprob_entries:
                raise ClientError(
                    400,
                    "too_large",
                    f"n={p['n']} x max_tokens={p['max_tokens']} x (logprobs {top} + 1) = {entries} "
                    f"log-probabilities, over the limit of {limits.max_logprob_entries} "
                    "(limits.max_logprob_entries); ask for fewer tokens, choices or top log-probabilities",
                )

    def cost(self, judge: Judge) -> Cost:
        return Cost(self.params["n"])

    async def tokens(self, judge: Judge, ctx: RequestContext) -> list[int]:
        """The prompt's token ids, in the request's place in the tokeniser queue."""
        engine = judge.engine
        if self.messages is None:
            build = lambda: engine.text_ids(self.prompt, True)  # noqa: E731
        else:
            messages = chat_messages(self.messages)
            build = lambda: engine.chat_ids(messages, generation_prompt=True, images=self.images)  # noqa: E731
        self.ids = await engine.tokenize(build, ctx.tokenize_priority())
        ctx.engine_requests += self.params["n"]
        ctx.prompt_tokens += len(self.ids)
        return self.ids

    def outputs(self, judge: Judge, ctx: RequestContext, *, delta: bool):
        """The engine's outputs for the admitted request (an async iterator)."""
        return judge.engine.generate_stream(
            self.ids, self.params, images=self.images or None, delta=delta, **ctx.engine_args()
        )

    def outcome(self, result, answer) -> Outcome:
        return Outcome(self.params["n"], 0)


def chat_messages(messages: list) -> list[dict]:
    """Chat messages for the model's chat template; images marked where they go (see ``tokens``)."""
    out = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        if m.content is None or isinstance(m.content, str):
            out.append({"role": role, "content": m.content or ""})
            continue
        text, images = [], []
        for part in m.content:
            if isinstance(part, TextPart):
                text.append(part.text)
            else:
                text.append(image_marker(len(images)))
                images.append(part._image)
        out.append({"role": role, "content": "".join(text), **({"images": images} if images else {})})
    return out
