"""The native routes' questions: /score, /pairwise, /judge and /winrate (also queued messages)."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any

from referee.protocol import (
    JudgeRequest,
    JudgeResponse,
    JudgeResult,
    PairwiseRequest,
    PairwiseResponse,
    PairwiseResult,
    ScoreRequest,
    ScoreResponse,
    ScoreResult,
    Steps,
    Usage,
    WinRateRequest,
    WinRateResponse,
    content_text,
    image_parts,
)
from referee.rewards import circular_pairs, group_advantages, shape_reward, tally_group

from ..errors import ClientError
from ..judges import Judge, Rating, RequestContext
from ..judges.generative import images_per_prompt as images_in_extra
from .base import (
    Cost,
    Outcome,
    Question,
    Texts,
    _attempts,
    _check_mode,
    _check_samples,
    _check_steps,
    _options,
)

# ---------------------------------------------------------------- /score


class ScoreQuestion(Question):
    route = "score"
    request: ScoreRequest

    def texts(self) -> Texts:
        out = list(super().texts())
        for k, it in enumerate(self.request.items):
            out.append((f"items[{k}].response", content_text(it.response)))
            if it.reference is not None:
                out.append((f"items[{k}].reference", content_text(it.reference)))
        return out

    def judged(self):
        for k, it in enumerate(self.request.items):
            for side in ("response", "reference"):
                if getattr(it, side) is not None:
                    yield f"items[{k}].{side}", it.prompt, getattr(it, side)

    def generation(self) -> tuple[int | None, int]:
        return None, 0

    def prepare(self, judge: Judge) -> None:
        if self.request.aggregate is not None and judge.kind != "prm":
            raise ClientError(
                400,
                "bad_request",
                f"aggregate is for process reward models (kind prm); {judge.name!r} is not",
            )
        _check_steps(judge, self.judged())
        self.transform = _transform(judge, self.request)
        self.opts = _options(judge.rating_options, self.request)
        # Each distinct (prompt, reference) is judged once, however many items share it.
        self.refs: list[tuple] = []
        for it in self.request.items:
            if it.reference is not None and (it.prompt, it.reference) not in self.refs:
                self.refs.append((it.prompt, it.reference))

    def cost(self, judge: Judge) -> Cost:
        return Cost(len(self.request.items) + len(self.refs), judge.rating_cost())

    async def run(self, judge: Judge, ctx: RequestContext) -> list[ScoreResult]:
        items, opts = self.request.items, self.opts
        rated = await asyncio.gather(
            *[judge.rate(it.prompt, it.response, ctx, **opts) for it in items],
            *[judge.rate(prompt, reference, ctx, **opts) for prompt, reference in self.refs],
        )
        ratings, ref_ratings = rated[: len(items)], rated[len(items) :]
        results = []
        for k, (it, r) in enumerate(zip(items, ratings, strict=True)):
            result = ScoreResult(
                index=k,
                score=r.score,
                label_mass=r.label_mass,
                objectives=r.objectives,
                members=r.members,
                uncertainty=r.uncertainty,
                step_scores=r.step_scores,
                step_spans=None if r.step_spans is None else [list(span) for span in r.step_spans],
                error=r.error,
            )
            if self.transform != "none":
                ref = it.reference_score
                if it.reference is not None:
                    rr = ref_ratings[self.refs.index((it.prompt, it.reference))]
                    ref = rr.reward
                    if ref is None and result.error is None:
                        result.error = f"the reference could not be judged: {rr.error or 'no reward'}"
                result.raw_score, result.reference_score = r.reward, ref
                result.score = None
                if r.reward is not None and ref is not None:
                    result.score = shape_reward(r.reward, ref, self.transform)
            results.append(result)
        return results

    def outcome(self, result: list[ScoreResult], answer) -> Outcome:
        return Outcome(len(result), sum(r.error is not None for r in result))

    def answer(self, judge: Judge, result, usage: Usage) -> ScoreResponse:
        return ScoreResponse(judge=judge.name, results=result, usage=usage)


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


# ---------------------------------------------------------------- /pairwise


class PairwiseQuestion(Question):
    route = "pairwise"
    request: PairwiseRequest

    def texts(self) -> Texts:
        out = list(super().texts())
        for k, it in enumerate(self.request.items):
            out.append((f"items[{k}].response_a", content_text(it.response_a)))
            out.append((f"items[{k}].response_b", content_text(it.response_b)))
        return out

    def judged(self):
        for k, it in enumerate(self.request.items):
            for side in ("response_a", "response_b"):
                yield f"items[{k}].{side}", it.prompt, getattr(it, side)

    def prepare(self, judge: Judge) -> None:
        req = self.request
        _check_steps(judge, self.judged())
        _check_mode(judge, req.mode)
        _check_samples(req, req.mode)
        rng = random.Random(req.seed)
        self.swaps = [req.order == "random" and rng.random() < 0.5 for _ in req.items]
        self.opts = _options(judge.pair_options, req)
        self.rule = judge.inconsistent_rule(req)

    def cost(self, judge: Judge) -> Cost:
        req = self.request
        return Cost(
            len(req.items), judge.pair_cost(req.order), _attempts(req.mode, req.max_retries, req.samples)
        )

    async def run(self, judge: Judge, ctx: RequestContext) -> list[PairwiseResult]:
        req = self.request
        results = await asyncio.gather(
            *[
                judge.judge_pair(
                    it.prompt,
                    it.response_a,
                    it.response_b,
                    ctx,
                    order=req.order,
                    swap=swap,
                    opts=self.opts,
                    rule=self.rule,
                )
                for it, swap in zip(req.items, self.swaps, strict=True)
            ]
        )
        for k, r in enumerate(results):
            r.index = k
        return list(results)

    def outcome(self, result: list[PairwiseResult], answer) -> Outcome:
        verdicts = [r.verdict for r in result]
        return Outcome(len(result), verdicts.count("invalid"), verdicts)

    def answer(self, judge: Judge, result, usage: Usage) -> PairwiseResponse:
        return PairwiseResponse(judge=judge.name, results=result, usage=usage)


# ---------------------------------------------------------------- /judge (chain of thought)


class CotJudgeQuestion(Question):
    route = "judge"  # a kind that serves /judge reasons (rate_cot)
    request: JudgeRequest

    def texts(self) -> Texts:
        out = list(super().texts())
        for k, it in enumerate(self.request.items):
            out += [
                (f"items[{k}].{f}", content_text(getattr(it, f)))
                for f in ("response", "response_a", "response_b")
                if getattr(it, f) is not None
            ]
        return out

    def judged(self):
        for k, it in enumerate(self.request.items):
            for side in ("response", "response_a", "response_b"):
                if getattr(it, side) is not None:
                    yield f"items[{k}].{side}", it.prompt, getattr(it, side)

    def cost(self, judge: Judge) -> Cost:
        return Cost(
            len(self.request.items), 1, _attempts("cot", self.request.max_retries, self.request.samples)
        )

    async def run(self, judge: Judge, ctx: RequestContext) -> list[JudgeResult]:
        req = self.request
        gen = dict(
            max_new_tokens=req.max_new_tokens, max_retries=req.max_retries, seed=req.seed, samples=req.samples
        )

        async def one(k: int, it) -> JudgeResult:
            if it.response is not None:
                r = await judge.rate_cot(it.prompt, it.response, ctx, rubric=req.rubric, **gen)
                return JudgeResult(
                    index=k,
                    kind="score",
                    score=r.score,
                    rationale=r.rationale,
                    attempts=r.attempts,
                    votes=r.votes,
                    uncertainty=r.uncertainty if req.samples > 1 else None,
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
                votes=c.votes,
                uncertainty=c.uncertainty if req.samples > 1 else None,
                error=c.error,
            )

        return list(await asyncio.gather(*[one(k, it) for k, it in enumerate(req.items)]))

    def outcome(self, result: list[JudgeResult], answer) -> Outcome:
        return Outcome(
            len(result),
            sum(r.error is not None for r in result),
            [r.verdict for r in result if r.verdict is not None],
        )

    def answer(self, judge: Judge, result, usage: Usage) -> JudgeResponse:
        return JudgeResponse(judge=judge.name, results=result, usage=usage)


# ---------------------------------------------------------------- /winrate


@dataclass
class _Group:
    pairs: list[tuple[int, int]]
    results: list[PairwiseResult]
    ratings: list[Rating] | None
    rankings: Any = None


def images_per_prompt(judge: Judge) -> int | None:
    """The images one engine prompt of the judge may hold (vLLM's ``limit_mm_per_prompt``, where the
    judge's engine settings give one), or None where nothing is configured."""
    engine = getattr(judge.settings, "engine", None)
    return images_in_extra(getattr(engine, "extra", None) or {})


def _check_images_per_prompt(judge: Judge, prompt, responses: list, shown: str) -> None:
    """A listwise ranking puts every response's images in one prompt: refused before admission
    when the judge's engine takes fewer images per prompt (422 naming both numbers)."""
    limit = images_per_prompt(judge)
    if limit is None:
        return
    prompt_images = 0 if isinstance(prompt, str) else sum(len(image_parts(m.content)) for m in prompt)
    count = prompt_images + sum(len(image_parts(r)) for r in responses)
    if count > limit:
        raise ClientError(
            422,
            "too_many_images",
            f"{shown} in one prompt: {count} images, over judge {judge.name!r}'s {limit} per prompt "
            "(engine.extra.limit_mm_per_prompt.image); use schedule=pairs, or raise the judge's limit",
        )


class WinRateQuestion(Question):
    route = "winrate"
    request: WinRateRequest

    def items(self) -> int:
        return 1  # one group; its size has its own limit (limits.max_group_size)

    def group_size(self) -> int:
        return len(self.request.responses)

    def prompts(self):
        return [("prompt", self.request.prompt)]

    def texts(self) -> Texts:
        return [
            *super().texts(),
            *((f"responses[{k}]", content_text(r)) for k, r in enumerate(self.request.responses)),
        ]

    def contents(self):
        req = self.request
        return [
            ("prompt", req.prompt),
            *((f"responses[{k}]", r) for k, r in enumerate(req.responses) if not isinstance(r, Steps)),
        ]

    def judged(self):
        return ((f"responses[{k}]", self.request.prompt, r) for k, r in enumerate(self.request.responses))

    def prepare(self, judge: Judge) -> None:
        req = self.request
        _check_steps(judge, self.judged())
        _check_mode(judge, req.mode)
        n = len(req.responses)
        self.rule = judge.inconsistent_rule(req) if req.order == "both" and not judge.pointwise else None
        self.opts = _options(judge.pair_options, req)
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
            if req.samples > 1:
                raise ClientError(400, "bad_request", "samples applies to schedule=pairs (mode=cot) only")
            size = getattr(judge.settings, "listwise_group_size", None)
            if size is not None and n > size:
                raise ClientError(
                    413,
                    "too_large",
                    f"schedule=listwise: a group of {n} responses exceeds judge {judge.name!r}'s "
                    f"listwise_group_size {size}; use schedule=pairs, or split the group",
                )
            self.pairs = circular_pairs(n)
            self.swaps = []
            _check_images_per_prompt(
                judge, req.prompt, req.responses, "schedule=listwise shows the whole group"
            )
        else:
            _check_samples(req, req.mode)
            self.pairs = judge.schedule(n, req.opponents)
            rng = random.Random(req.seed)
            self.swaps = [req.order == "random" and rng.random() < 0.5 for _ in self.pairs]

    def cost(self, judge: Judge) -> Cost:
        req = self.request
        if req.schedule == "listwise":
            return Cost(1, judge.list_cost(req.order), _attempts("cot", req.max_retries))
        n = len(req.responses)
        attempts = _attempts(req.mode, req.max_retries, req.samples)
        return Cost(1, judge.group_cost(n, self.pairs, req.order), attempts)

    async def run(self, judge: Judge, ctx: RequestContext) -> _Group:
        req = self.request
        common = dict(order=req.order, opts=self.opts, rule=self.rule or "tie")
        if req.schedule == "listwise":
            results, rankings = await judge.judge_list(
                req.prompt, req.responses, ctx, seed=req.seed, **common
            )
            return _Group(self.pairs, results, None, rankings)
        results, ratings = await judge.judge_group(
            req.prompt, req.responses, self.pairs, ctx, swaps=self.swaps, **common
        )
        return _Group(self.pairs, results, ratings)

    def outcome(self, result: _Group, answer: WinRateResponse) -> Outcome:
        return Outcome(len(result.pairs), answer.invalid, [r.verdict for r in result.results])

    def answer(self, judge: Judge, result: _Group, usage: Usage) -> WinRateResponse:
        req = self.request
        tally = tally_group(
            len(req.responses),
            result.pairs,
            [(r.p_a, r.verdict, r.error) for r in result.results],
            soft=req.soft,
            estimate=req.estimate,
        )
        ratings = result.ratings
        scores = None if ratings is None else [r.score for r in ratings]
        if scores is None and tally.strengths is not None:
            scores = tally.strengths
        spreads = None if ratings is None else [r.uncertainty for r in ratings]
        min_mass = getattr(judge.settings, "min_label_mass", 0.0)
        return WinRateResponse(
            judge=judge.name,
            win_rates=tally.win_rates,
            advantages=group_advantages(tally.win_rates),
            win_matrix=tally.win_matrix,
            scores=scores,
            uncertainties=spreads if spreads and any(u is not None for u in spreads) else None,
            comparisons=len(result.pairs),
            rankings=result.rankings,
            ties=tally.ties,
            invalid=tally.invalid,
            inconsistent=sum(r.inconsistent_rule is not None for r in result.results),
            inconsistent_rule=self.rule,
            low_label_mass=sum(_low_label_mass(r, min_mass) for r in result.results),
            errors=tally.errors,
            usage=usage,
        )


def _low_label_mass(r: PairwiseResult, minimum: float) -> bool:
    """Made invalid by the min_label_mass rule (no label at all was invalid before the rule)."""
    mass = r.label_mass
    return r.verdict == "invalid" and mass is not None and 0.0 < mass < minimum
