"""Instruction-tuned (vision-)language models judging through prompts (``kind: generative``)."""

from __future__ import annotations

import asyncio
import math
import random
import statistics
from collections.abc import Callable
from functools import partial
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from referee.protocol import PairwiseResult, Prompt
from referee.rewards import circular_pairs, verdict_credit

from .. import templates
from ..engine_types import NOT_PER_ITEM, Completion
from ..judge_settings import EngineJudgeSettings, InconsistentRule, TieMargin
from .base import (
    Comparison,
    Judge,
    JudgeConfigError,
    Rating,
    RequestContext,
    _completion_from_json,
    _completion_json,
    _describe,
    low_mass_error,
    verdict_from_probability,
)


class GenerativeSettings(EngineJudgeSettings):
    kind: Literal["generative"] = "generative"
    verdict_format: Literal["brackets", "answer_tag"] = Field(
        "brackets",
        description="Chain-of-thought pairwise verdicts: brackets: a last line [[A]], [[B]] or [[TIE]] "
        "(MT-Bench); answer_tag: reasoning in <think>, then <answer>Image 1 is better</answer> (or 2; "
        "'Response' for text), the format UnifiedReward-Think is trained on. Both are parsed strictly.",
    )
    template: Literal["referee", "unifiedreward_think"] = Field(
        "referee",
        description="The prompt layout of chain-of-thought pairwise verdicts. referee: referee's own "
        "templates (delimited blocks, verdict_format). unifiedreward_think: UnifiedReward-Think's "
        "layout and verdicts as the model was trained on them (one user turn, no system prompt of "
        "ours, the pictures first; <answer>Image 1 is better</answer> for two images, <answer>Answer "
        "1 is better</answer> for two text answers), parsed strictly: anything else is invalid. "
        "Logprob verdicts, ratings and listwise rankings keep referee's templates.",
    )
    listwise_group_size: int | None = Field(
        None,
        ge=2,
        description="The largest group this judge ranks in one prompt (/winrate schedule=listwise); "
        "a larger listwise group is refused (413). None: limits.max_group_size. A vision-language "
        "judge shows a group of image responses in one prompt, so this many images must fit in "
        "its engine.extra.limit_mm_per_prompt.image, or the judge is refused at load.",
    )
    scale_low: int = 1
    scale_high: int = 9
    top_logprobs: int = Field(20, ge=2, le=20, description="Top log-probabilities read for label tokens.")
    tie_margin: TieMargin = 0.0
    inconsistent: InconsistentRule = "tie"
    min_label_mass: float = Field(
        0.01,
        ge=0,
        lt=1,
        description="Logprob verdicts and ratings: when the judge's next-token probability on the "
        "labels (A and B, or the scale's) is below this, it is not answering the question and the "
        "verdict or rating is invalid; 0 turns the check off. 0.01: a label mass of 1e-3 (one label "
        "alone in the top logprobs, P(A) exactly 1) is noise, while small judges that hedge with "
        "another first token still rank the labels (the embedded SmolLM2 judge puts about 0.04 on "
        "A and B for the README's pair, beginning with '<<').",
    )
    cot_max_new_tokens: int = Field(512, ge=1)
    cot_temperature: float = Field(0.0, ge=0, description="First attempt; retries sample at 0.7.")
    sample_temperature: float = Field(
        0.7, gt=0, description="The temperature of sampled judgments (a request's samples > 1)."
    )

    @model_validator(mode="after")
    def _scale(self) -> GenerativeSettings:
        if self.scale_high <= self.scale_low:
            raise ValueError("scale_high must be greater than scale_low")
        if (
            self.template == "unifiedreward_think"
            and "verdict_format" in self.model_fields_set
            and self.verdict_format != "answer_tag"
        ):
            raise ValueError(
                f"template unifiedreward_think has its own verdict format (<answer>...</answer>); "
                f"verdict_format {self.verdict_format} does not apply: leave it out"
            )
        limit = images_per_prompt(self.engine.extra)
        if self.listwise_group_size is not None and limit is not None and self.listwise_group_size > limit:
            raise ValueError(
                f"listwise_group_size {self.listwise_group_size} cannot fit in "
                f"engine.extra.limit_mm_per_prompt.image {limit}: a listwise group of image responses "
                f"shows {self.listwise_group_size} images in one prompt; raise the image limit to at "
                f"least {self.listwise_group_size} or lower listwise_group_size to {limit}"
            )
        return self


def images_per_prompt(extra: dict) -> int | None:
    """vLLM's ``limit_mm_per_prompt`` image limit from an engine's ``extra`` arguments (a mapping
    ``{image: N}``, or vLLM's form ``{image: {count: N}}``), None where it is not set."""
    limit = (extra or {}).get("limit_mm_per_prompt") or {}
    value = limit.get("image") if isinstance(limit, dict) else None
    if isinstance(value, dict):
        value = value.get("count")
    return int(value) if value is not None else None


class GenerativeJudge(Judge):
    """An instruction-tuned LLM judging through prompt templates (see ``templates``)."""

    settings: GenerativeSettings
    routes = ("score", "pairwise", "judge", "winrate")
    pairwise_modes = ("logprob", "cot")
    pointwise = False
    schedules = ("pairs", "listwise")
    abilities = frozenset({"chat"})
    runner: ClassVar[str | None] = "generate"

    def rating_options(self, req) -> dict:
        self.objective_options(req)
        return {"rubric": req.rubric}

    def pair_options(self, req) -> dict:
        self.objective_options(req)
        return dict(
            mode=req.mode,
            rubric=req.rubric,
            max_new_tokens=req.max_new_tokens,
            max_retries=req.max_retries,
            seed=req.seed,
            samples=req.samples,
        )

    def __post_init__(self) -> None:
        if not self.engine.tokenizer.chat_template:
            raise JudgeConfigError(
                f"judge {self.name!r}: the model {self.settings.model} has no chat template; a "
                "generative judge must be an instruction-tuned chat model"
            )
        self.scale = templates.Scale(self.settings.scale_low, self.settings.scale_high)
        for label in ["A", "B", *self.scale.labels]:
            ids = [
                tid for text in (label, " " + label) if (tid := self.engine.single_token_id(text)) is not None
            ]
            if not ids:
                raise JudgeConfigError(
                    f"judge {self.name!r}: the label {label!r} is not a single token of this model's "
                    "tokenizer; choose a scale whose labels are (for example scale 1..9)"
                )
            self.label_ids[label] = ids

    def _label_mass(self, logprobs: dict[int, float], label: str) -> float:
        return sum(math.exp(logprobs[t]) for t in self.label_ids[label] if t in logprobs)

    async def _generate(self, build: Callable[[], list[dict]], ctx: RequestContext, **kwargs):
        """One generation for the judge prompt ``build()`` makes. The prompt is built (templated,
        every text defused) and tokenised in the engine's tokeniser thread, never in the event loop:
        a group's thousands of prompts would otherwise block it for their whole length."""
        images: list = []
        ids = await self.engine.tokenize(
            lambda: self.engine.chat_ids(build(), generation_prompt=True, images=images),
            ctx.tokenize_priority(),
        )
        self._fit(ids, generate=True)

        async def run() -> Completion:
            ctx.engine_requests += 1
            try:
                extra = {"images": images} if images else {}
                out = await self.engine.complete(ids, **ctx.engine_args(), **kwargs, **extra)
            finally:
                ctx.engine_done()
            ctx.prompt_tokens += out.prompt_tokens
            ctx.completion_tokens += out.completion_tokens
            return out

        # only what the engine would answer the same way again: greedy, or seeded sampling
        deterministic = kwargs.get("temperature", 0.0) == 0.0 or kwargs.get("seed") is not None
        key = self._cache_key(ctx, "complete", ids, images, sorted(kwargs.items())) if deterministic else None
        return await self._cached(ctx, key, run, encode=_completion_json, decode=_completion_from_json)

    async def compare(
        self,
        prompt: Prompt,
        first: str,
        second: str,
        ctx: RequestContext,
        *,
        mode: str = "logprob",
        rubric: str | None = None,
        max_new_tokens: int | None = None,
        max_retries: int = 0,
        seed: int | None = None,
        samples: int = 1,
    ) -> Comparison:
        try:
            if mode == "logprob":
                return await self._compare_logprob(prompt, first, second, rubric, ctx)
            return await self._compare_cot(
                prompt, first, second, rubric, ctx, max_new_tokens, max_retries, seed, samples
            )
        except NOT_PER_ITEM:  # not a per-item cause: the request fails (503)
            raise
        except Exception as exc:
            return Comparison(None, "invalid", error=_describe(exc))

    async def _compare_logprob(self, prompt, first, second, rubric, ctx) -> Comparison:
        out = await self._generate(
            lambda: templates.pairwise_logprob(prompt, first, second, rubric),
            ctx,
            max_tokens=1,
            top_logprobs=self.settings.top_logprobs,
        )
        pa = self._label_mass(out.first_token_logprobs, "A")
        pb = self._label_mass(out.first_token_logprobs, "B")
        if pa + pb == 0.0:
            return Comparison(
                None,
                "invalid",
                error=f"neither A nor B is among the judge's top {self.settings.top_logprobs} next tokens "
                f"(it began with {out.text!r})",
                label_mass=0.0,
            )
        mass = pa + pb
        if mass < self.settings.min_label_mass:
            # P(A) = pa / (pa + pb) would rest on the tail of the distribution (and is exactly 0 or 1
            # when only one label made the top logprobs): not a verdict.
            return Comparison(
                None,
                "invalid",
                error=low_mass_error(mass, self.settings.min_label_mass, "A and B")
                + f" (it began with {out.text!r})",
                label_mass=mass,
                low_label_mass=True,
            )
        p = pa / mass
        return Comparison(p, verdict_from_probability(p, self.settings.tie_margin), label_mass=mass)

    async def _attempts(self, build, ctx, max_new_tokens, max_retries, seed, parse, temperature=None):
        """Reason-then-answer with bounded retries; the first attempt is greedy unless configured
        (or sampled at ``temperature``: one of several sampled judgments)."""
        budget = max_new_tokens or self.settings.cot_max_new_tokens
        text, why = "", ""
        first = self.settings.cot_temperature if temperature is None else temperature
        for attempt in range(max_retries + 1):
            temperature = first if attempt == 0 else max(first, 0.7)
            out = await self._generate(
                build,
                ctx,
                max_tokens=budget,
                temperature=temperature,
                seed=None if seed is None else seed + attempt,
            )
            text = out.text
            value, why = parse(text)
            if value is not None:
                return value, text, attempt + 1, None
            if out.finish_reason == "length":
                why += f" (the reasoning was cut at max_new_tokens={budget})"
        return None, text, max_retries + 1, why

    async def _sampled(self, build, ctx, max_new_tokens, max_retries, seed, parse, samples: int):
        """``samples`` sampled judgments at ``sample_temperature`` (seeded ``seed + k`` when a seed
        is given), each with its own bounded retries: [(value, text, attempts, why)]."""
        return await asyncio.gather(
            *[
                self._attempts(
                    build,
                    ctx,
                    max_new_tokens,
                    max_retries,
                    None if seed is None else seed + 1_000_003 * (k + 1),
                    parse,
                    temperature=self.settings.sample_temperature,
                )
                for k in range(samples)
            ]
        )

    async def _compare_cot(
        self, prompt, first, second, rubric, ctx, max_new_tokens, max_retries, seed, samples=1
    ):
        if self.settings.template == templates.UNIFIEDREWARD_THINK:
            noun = templates.unifiedreward_think_noun(first, second)
            messages = partial(templates.unifiedreward_think_pair, prompt, first, second, rubric)
            parse = partial(templates.parse_unifiedreward_think, noun=noun)
        elif self.settings.verdict_format == "answer_tag":
            messages = partial(templates.pairwise_answer_tag, prompt, first, second, rubric)
            parse = templates.parse_answer_tag
        else:
            messages = partial(templates.pairwise_cot, prompt, first, second, rubric)
            parse = templates.parse_verdict
        if samples > 1:  # self-consistency: the majority of sampled verdicts
            outs = await self._sampled(messages, ctx, max_new_tokens, max_retries, seed, parse, samples)
            return vote(outs)
        verdict, text, attempts, why = await self._attempts(
            messages, ctx, max_new_tokens, max_retries, seed, parse
        )
        if verdict is None:
            return Comparison(None, "invalid", rationale=text, attempts=attempts, error=why)
        return Comparison(verdict_credit(verdict), verdict, rationale=text, attempts=attempts)

    async def rate(
        self, prompt: Prompt, response: str, ctx: RequestContext, *, rubric: str | None = None
    ) -> Rating:
        """Expected rating under the judge's probabilities over the scale's labels (one token)."""
        try:
            out = await self._generate(
                lambda: templates.pointwise_logprob(prompt, response, rubric, self.scale),
                ctx,
                max_tokens=1,
                top_logprobs=self.settings.top_logprobs,
            )
        except NOT_PER_ITEM:  # not a per-item cause: the request fails (503)
            raise
        except Exception as exc:
            return Rating(None, error=_describe(exc))
        masses = {
            int(label): self._label_mass(out.first_token_logprobs, label) for label in self.scale.labels
        }
        total = sum(masses.values())
        if total == 0.0:
            return Rating(
                None,
                error=f"no rating label {self.scale.low}..{self.scale.high} is among the judge's top "
                f"{self.settings.top_logprobs} next tokens (it began with {out.text!r})",
                label_mass=0.0,
            )
        if total < self.settings.min_label_mass:
            return Rating(
                None,
                error=low_mass_error(
                    total, self.settings.min_label_mass, f"the labels {self.scale.low}..{self.scale.high}"
                )
                + f" (it began with {out.text!r})",
                label_mass=total,
            )
        return Rating(sum(v * m for v, m in masses.items()) / total, label_mass=total)

    def list_cost(self, order: str) -> int:
        """Engine requests of one listwise ranking of a group (before retries)."""
        return 2 if order == "both" else 1

    async def judge_list(
        self,
        prompt: Prompt,
        responses: list,
        ctx: RequestContext,
        *,
        order: str,
        seed: int | None,
        opts: dict,
        rule: str,
    ) -> tuple[list[PairwiseResult], list[list[int] | None]]:
        """A whole group ranked in one generation (per order), read as every pair's verdict.

        order=both shows the group forward and reversed: a pair ranked one way in one listing and
        the other way in the other is inconsistent, and ``rule`` decides it as for pairs (average
        of a win and a loss is a tie). A ranking that is not a strict permutation of the group is
        invalid (retried up to max_retries), never guessed at."""
        n = len(responses)
        shown_orders = [list(range(n))]
        if order == "both":
            shown_orders.append(list(reversed(range(n))))
        elif order == "random":
            random.Random(seed).shuffle(shown_orders[0])

        async def rank(shown: list[int]):
            messages = partial(
                templates.listwise_cot, prompt, [responses[i] for i in shown], opts.get("rubric")
            )
            try:
                ranking, _, _, why = await self._attempts(
                    messages,
                    ctx,
                    opts.get("max_new_tokens"),
                    opts.get("max_retries", 0),
                    seed,
                    lambda out: templates.parse_ranking(out, n),
                )
            except NOT_PER_ITEM:
                raise
            except Exception as exc:
                return None, _describe(exc)
            return (None, why) if ranking is None else ([shown[p] for p in ranking], "")

        ranked = await asyncio.gather(*[rank(shown) for shown in shown_orders])
        rankings = [r for r, _ in ranked]
        why = "; ".join(f"listing {k + 1}: {w}" for k, (r, w) in enumerate(ranked) if r is None)
        place = [None if r is None else {resp: pos for pos, resp in enumerate(r)} for r in rankings]
        results = []
        for i, j in circular_pairs(n):
            if responses[i] == responses[j]:
                results.append(PairwiseResult(index=0, p_a=0.5, verdict="tie"))
                continue
            if why:
                results.append(PairwiseResult(index=0, verdict="invalid", error=why))
                continue
            credits = [1.0 if p[i] < p[j] else 0.0 for p in place]
            result = PairwiseResult(index=0, p_a=credits[0], verdict="A" if credits[0] else "B")
            if len(credits) == 2:
                result.consistent = credits[0] == credits[1]
                if not result.consistent:
                    result.inconsistent_rule = rule
                    if rule == "drop":
                        result.p_a, result.verdict = None, "invalid"
                        result.error = "ranked differently in the two listings, dropped by inconsistent=drop"
                    else:  # tie, or the average of a win and a loss
                        result.p_a, result.verdict = 0.5, "tie"
            results.append(result)
        return results, rankings

    async def rate_cot(
        self, prompt, response, ctx, *, rubric=None, max_new_tokens=None, max_retries=0, seed=None, samples=1
    ) -> Rating:
        try:
            messages = partial(templates.pointwise_cot, prompt, response, rubric, self.scale)
            parse = lambda out: templates.parse_rating(out, self.scale)  # noqa: E731
            if samples > 1:
                outs = await self._sampled(messages, ctx, max_new_tokens, max_retries, seed, parse, samples)
                return mean_rating(outs)
            score, text, attempts, why = await self._attempts(
                messages, ctx, max_new_tokens, max_retries, seed, parse
            )
        except NOT_PER_ITEM:  # not a per-item cause: the request fails (503)
            raise
        except Exception as exc:
            return Rating(None, error=_describe(exc))
        return Rating(score, rationale=text, attempts=attempts, error=why)


def vote(outs: list[tuple]) -> Comparison:
    """The majority of sampled verdicts (self-consistency, Wang et al. 2023, arXiv:2203.11171; NeMo
    Gym's judges take the majority of several samples too). P(first) is the samples' mean credit
    (A 1, tie 1/2, B 0); the verdict the most frequent one, a tie when A and B are equally frequent;
    the uncertainty the standard deviation of the credits. An unparsable sample is counted under
    ``invalid`` and never votes; with no valid sample the comparison is invalid."""
    votes = {"A": 0, "B": 0, "tie": 0, "invalid": 0}
    credits, texts, whys = [], {}, []
    for verdict, text, _, why in outs:
        if verdict is None:
            votes["invalid"] += 1
            whys.append(why)
            continue
        votes[verdict] += 1
        credits.append(verdict_credit(verdict))
        texts.setdefault(verdict, text)
    attempts = sum(a for _, _, a, _ in outs)
    if not credits:
        return Comparison(
            None,
            "invalid",
            rationale=outs[0][1],
            attempts=attempts,
            error=f"none of {len(outs)} sampled judgments gave a verdict: {whys[0]}",
            votes=votes,
        )
    top = max(votes["A"], votes["B"], votes["tie"])
    leaders = [v for v in ("A", "B", "tie") if votes[v] == top]
    verdict = leaders[0] if len(leaders) == 1 else "tie"
    return Comparison(
        statistics.fmean(credits),
        verdict,
        rationale=texts.get(verdict) or next(iter(texts.values())),
        attempts=attempts,
        uncertainty=statistics.pstdev(credits),
        votes=votes,
    )


def mean_rating(outs: list[tuple]) -> Rating:
    """The mean of sampled ratings; their standard deviation as the uncertainty; unparsable samples
    counted apart (``votes['invalid']``)."""
    scores = [score for score, _, _, _ in outs if score is not None]
    votes: dict[str, int] = {}
    for score, _, _, _ in outs:
        key = "invalid" if score is None else f"{score:g}"
        votes[key] = votes.get(key, 0) + 1
    attempts = sum(a for _, _, a, _ in outs)
    if not scores:
        why = next(w for _, _, _, w in outs)
        return Rating(
            None,
            rationale=outs[0][1],
            attempts=attempts,
            error=f"none of {len(outs)} sampled judgments gave a rating: {why}",
            votes=votes,
        )
    text = next(t for score, t, _, _ in outs if score is not None)
    return Rating(
        statistics.fmean(scores),
        rationale=text,
        attempts=attempts,
        uncertainty=statistics.pstdev(scores),
        votes=votes,
    )
