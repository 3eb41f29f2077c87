"""Several judges of the server as one, with their disagreement reported (``kind: ensemble``)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Literal

from pydantic import Field, model_validator

from referee.protocol import Prompt

from ..judge_settings import InconsistentRule, JudgeSettings, TieMargin
from .base import Capabilities, Comparison, Judge, Rating, RequestContext, verdict_from_probability


class EnsembleSettings(JudgeSettings):
    kind: Literal["ensemble"] = "ensemble"
    members: list[str] = Field(
        description="The names of two or more judges listed before it in this file. If all of them "
        "rate responses on their own (classifier, clip, followup), so does the ensemble and a group "
        "costs N ratings per member; otherwise pairs are compared by every member.",
    )
    aggregate: Literal["mean", "worst", "uncertainty"] = Field(
        "mean",
        description="How member rewards combine (Coste et al. 2024, 'Reward Model Ensembles Help "
        "Mitigate Overoptimization'): mean; worst: the lowest member reward (worst-case "
        "optimisation); uncertainty: mean - uncertainty_penalty x std (uncertainty-weighted "
        "optimisation). For pairs: the mean P(A); worst: the member least sure of the mean's "
        "winner (a tie when members disagree); uncertainty: |P(A) - 1/2| shrunk by penalty x std.",
    )
    uncertainty_penalty: float = Field(
        1.0, ge=0, description="aggregate=uncertainty: lambda in mean - lambda x std."
    )
    # members that compare pairs (generative): the ensemble's own verdict rules
    tie_margin: TieMargin = 0.0
    inconsistent: InconsistentRule = "tie"

    @model_validator(mode="after")
    def _members(self) -> EnsembleSettings:
        if len(self.members) < 2 or len(set(self.members)) != len(self.members):
            raise ValueError(f"ensemble {self.name!r}: list two or more distinct member judges in `members`")
        if self.model is None:
            self.model = "ensemble:" + "+".join(self.members)
        return self


def _spread(values: list[float]) -> float:
    """Population standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def aggregate_rewards(values: list[float], how: str, penalty: float) -> float:
    """Combine member rewards (Coste et al. 2024, "Reward Model Ensembles Help Mitigate
    Overoptimization", ICLR): mean; worst-case optimisation (the minimum); uncertainty-weighted
    optimisation (mean - penalty x std)."""
    mean = sum(values) / len(values)
    if how == "worst":
        return min(values)
    if how == "uncertainty":
        return mean - penalty * _spread(values)
    return mean


def aggregate_preferences(ps: list[float], how: str, penalty: float) -> float:
    """Combine member probabilities that the first response is better. mean: their mean; worst: the
    member least sure of the mean's winner, and 1/2 (a tie) as soon as one member prefers the other
    response; uncertainty: the mean's distance from 1/2 shrunk by penalty x std (never past 1/2), the
    pairwise counterpart of mean - lambda x std."""
    mean = sum(ps) / len(ps)
    if how == "worst":
        return max(0.5, min(ps)) if mean >= 0.5 else min(0.5, max(ps))
    if how == "uncertainty":
        shrunk = max(0.0, abs(mean - 0.5) - penalty * _spread(ps))
        return 0.5 + math.copysign(shrunk, mean - 0.5)
    return mean


class EnsembleJudge(Judge):
    """Several judges of the server as one: every member answers each question (all at once, so each
    member's engine batches its share) and the answers combine by ``aggregate``; every result
    reports the members' disagreement. A member failing on an item makes the ensemble's answer for
    that item invalid, naming the member: a missing opinion is not averaged away."""

    settings: EnsembleSettings

    def __init__(self, settings: EnsembleSettings, members: list[Judge]) -> None:
        super().__init__(settings, engine=None)  # type: ignore[arg-type] -- no engine of its own
        self.members = members
        self._capabilities = self.kind_capabilities([m.capabilities for m in members])

    @classmethod
    def kind_capabilities(cls, members: Sequence[Capabilities] = ()) -> Capabilities:
        """What every member can do: the native routes they all serve (never /judge, whose free
        reasoning does not average), the pairwise modes of every member that compares pairs
        (logprob when none does), pointwise when every member rates on its own."""
        if not members:
            raise ValueError("an ensemble's capabilities follow from its members': pass theirs")
        shared = set.intersection(*(set(m.routes) for m in members)) - {"judge"}
        pairwise = [set(m.pairwise_modes) for m in members if not m.pointwise]
        modes = set.intersection(*pairwise) if pairwise else {"logprob"}
        return Capabilities(
            routes=tuple(r for r in ("score", "pairwise", "winrate") if r in shared),
            pairwise_modes=tuple(m for m in ("logprob", "cot") if m in modes),
            schedules=cls.schedules,
            pointwise=all(m.pointwise for m in members),
            abilities=cls.abilities,
        )

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def pointwise(self) -> bool:  # type: ignore[override]
        return self._capabilities.pointwise

    @property
    def routes(self) -> tuple[str, ...]:  # type: ignore[override]
        return self._capabilities.routes

    @property
    def pairwise_modes(self) -> tuple[str, ...]:  # type: ignore[override]
        return self._capabilities.pairwise_modes

    @property
    def media(self) -> list[str]:
        return sorted(set.intersection(*(set(m.media) for m in self.members)))

    def validate(self, where: str, prompt: Prompt, response) -> None:
        for m in self.members:
            m.validate(where, prompt, response)

    def rating_cost(self) -> int:
        return sum(m.rating_cost() for m in self.members)

    def pair_cost(self, order: str) -> int:
        if self.pointwise:
            return 2 * self.rating_cost()
        return sum(m.pair_cost(order) for m in self.members)

    def rating_options(self, req) -> dict:
        return {"members": {m.name: m.rating_options(req) for m in self.members}}

    def pair_options(self, req) -> dict:
        return {"mode": req.mode, "members": {m.name: m.pair_options(req) for m in self.members}}

    def shutdown(self) -> None:
        """The members are judges of the server in their own right: they shut down themselves."""

    async def rate(self, prompt: Prompt, response, ctx: RequestContext, **opts) -> Rating:
        each = opts.get("members", {})
        ratings = await asyncio.gather(
            *[m.rate(prompt, response, ctx, **each.get(m.name, {})) for m in self.members]
        )
        rewards = {m.name: r.reward for m, r in zip(self.members, ratings, strict=True)}
        failed = [
            f"{m.name}: {r.error or 'no reward'}"
            for m, r in zip(self.members, ratings, strict=True)
            if r.reward is None
        ]
        if failed:
            return Rating(None, members=rewards, error="ensemble member failed: " + "; ".join(failed))
        values = list(rewards.values())
        value = aggregate_rewards(values, self.settings.aggregate, self.settings.uncertainty_penalty)
        return Rating(value, logit=value, members=rewards, uncertainty=_spread(values))

    async def compare(self, prompt: Prompt, first, second, ctx: RequestContext, **opts) -> Comparison:
        if self.pointwise:
            return await super().compare(prompt, first, second, ctx, **opts)
        each = opts.get("members", {})
        comparisons = await asyncio.gather(
            *[m.compare(prompt, first, second, ctx, **each.get(m.name, {})) for m in self.members]
        )
        failed = [
            f"{m.name}: {c.error or 'invalid verdict'}"
            for m, c in zip(self.members, comparisons, strict=True)
            if c.p_first is None
        ]
        masses = [c.label_mass for c in comparisons if c.label_mass is not None]
        mass = min(masses) if masses else None
        if failed:
            return Comparison(
                None,
                "invalid",
                error="ensemble member failed: " + "; ".join(failed),
                label_mass=mass,
                low_label_mass=any(c.low_label_mass for c in comparisons),
            )
        ps = [c.p_first for c in comparisons]
        p = aggregate_preferences(ps, self.settings.aggregate, self.settings.uncertainty_penalty)
        margin = self.settings.tie_margin if opts.get("mode", "logprob") == "logprob" else 0.0
        rationales = [
            f"[{m.name}] {c.rationale}" for m, c in zip(self.members, comparisons, strict=True) if c.rationale
        ]
        return Comparison(
            p,
            verdict_from_probability(p, margin),
            rationale="\n\n".join(rationales) or None,
            label_mass=mass,
            uncertainty=_spread(ps),
        )
