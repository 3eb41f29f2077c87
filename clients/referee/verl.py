"""verl: a batch ``compute_score`` backed by a referee judge.

Point verl's custom reward function at this module, with the batch reward manager::

    reward_model.reward_manager=batch
    custom_reward_function.path=<site-packages>/referee/verl.py
    custom_reward_function.name=compute_score
    +custom_reward_function.reward_kwargs.url=http://referee:8000
    +custom_reward_function.reward_kwargs.reward=winrate

verl passes the decoded responses (``solution_strs``), the dataset's ground truths and its
``extra_info`` dicts; the prompt is read from ``extra_info[prompt_key]``. ``reward`` chooses the
question: ``score`` (pointwise), ``preference`` (P(response better than the ground truth)) or
``winrate`` (Pref-GRPO: responses grouped by prompt with ``referee.rewards.group_by_prompt``, each
rewarded with its win rate; the only response to its prompt has none, and counts as unscored).

A server with tenants needs a key: set ``REFEREE_API_KEY`` in the environment of verl's reward
workers (the default of ``api_key``), rather than ``reward_kwargs.api_key``, which verl would print
with the rest of its configuration. ``job_id`` (``+custom_reward_function.reward_kwargs.job_id=...``)
names the job within the tenant for the server's fair sharing.

Process reward models (a judge of kind ``prm``, ``reward=score``): each response's reward is the
aggregate of its step scores (the judge's ``aggregate``, or ``reward_kwargs.aggregate``: min,
last, mean or product), and ``compute_score`` returns one dict per response, which verl's batch
reward manager splits into the reward (``score``) and its ``reward_extra_info``: ``steps`` (how
many), ``step_scores`` and ``step_spans`` (each step's ``[start, end)`` characters in the decoded
response). verl turns each extra into a numpy array over the batch, which responses with different
numbers of steps cannot make, so the two lists travel as JSON text: ``json.loads`` them to place the
step rewards on tokens (``referee.place_on_tokens``).

verl needs a number for every response, so a response the judge could not score raises an error
naming it (``on_error="raise"``, the default) or becomes NaN (``on_error="nan"``); it never
becomes a neutral score.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from typing import Any, Literal

from .client import AsyncReferee
from .defaults import DEFAULT_URL
from .protocol import PairwiseItem, PairwiseRequest, ScoreItem, ScoreRequest, WinRateRequest
from .rewards import SINGLE_RESPONSE, group_by_prompt

__all__ = ["compute_score"]


def compute_score(
    data_sources: Sequence[str],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Sequence[dict | None],
    *,
    url: str = DEFAULT_URL,
    judge: str | None = None,
    reward: Literal["score", "preference", "winrate"] = "score",
    prompt_key: str = "question",
    mode: str = "logprob",
    order: str = "both",
    on_error: Literal["raise", "nan"] = "raise",
    api_key: str | None = None,
    job_id: str | None = None,
    aggregate: str | None = None,
    **_: Any,
) -> list[float] | list[dict[str, Any]]:
    prompts = []
    for k, info in enumerate(extra_infos):
        info = info or {}
        prompt = info.get(prompt_key, info.get("prompt"))
        if prompt is None:
            raise KeyError(
                f"extra_infos[{k}] has no {prompt_key!r} (or 'prompt'): the judge needs the question"
            )
        prompts.append(prompt)
    values, errors, steps = asyncio.run(
        _judge(
            AsyncReferee(url, api_key=api_key, job_id=job_id),
            judge,
            reward,
            prompts,
            list(solution_strs),
            list(ground_truths),
            mode,
            order,
            aggregate,
        )
    )
    failed = [f"{k} ({data_sources[k]}): {e}" for k, e in enumerate(errors) if e is not None]
    if failed and on_error == "raise":
        raise RuntimeError("the judge could not score responses " + "; ".join(failed[:10]))
    scores = [math.nan if v is None else v for v in values]
    if not any(s is not None for s in steps):
        return scores
    return [_with_steps(score, s) for score, s in zip(scores, steps, strict=True)]


def _with_steps(score: float, steps: tuple[list[float], list[list[int]]] | None) -> dict[str, Any]:
    """A process reward model's answer for verl: the aggregate, and the steps as extras (the same
    keys for every response, as verl's reward_extra_info wants; none for an unscored one)."""
    step_scores, step_spans = steps or ([], [])
    return {
        "score": score,
        "steps": len(step_scores),
        "step_scores": json.dumps(step_scores),
        "step_spans": json.dumps(step_spans),
    }


async def _judge(client, judge, reward, prompts, responses, references, mode, order, aggregate=None):
    n = len(responses)
    values: list[float | None] = [None] * n
    errors: list[str | None] = [None] * n
    steps: list[tuple[list[float], list[list[int]]] | None] = [None] * n
    async with client:
        if reward == "score":
            out = await client.score(
                ScoreRequest(
                    judge=judge,
                    items=[ScoreItem(prompt=p, response=r) for p, r in zip(prompts, responses, strict=True)],
                    **({} if aggregate is None else {"aggregate": aggregate}),
                )
            )
            for k, r in enumerate(out.results):
                values[k], errors[k] = r.score, r.error
                if r.step_scores is not None and r.step_spans is not None:
                    steps[k] = (r.step_scores, r.step_spans)
        elif reward == "preference":
            out = await client.pairwise(
                PairwiseRequest(
                    judge=judge,
                    mode=mode,
                    order=order,
                    items=[
                        PairwiseItem(prompt=p, response_a=r, response_b=str(g))
                        for p, r, g in zip(prompts, responses, references, strict=True)
                    ],
                )
            )
            for k, r in enumerate(out.results):
                values[k], errors[k] = r.p_a, r.error
        else:
            groups = group_by_prompt(prompts)
            multi = [idx for idx in groups if len(idx) > 1]
            for idx in groups:
                if len(idx) == 1:
                    errors[idx[0]] = SINGLE_RESPONSE
            answers = await asyncio.gather(
                *[
                    client.winrate(
                        WinRateRequest(
                            judge=judge,
                            prompt=prompts[idx[0]],
                            responses=[responses[i] for i in idx],
                            mode=mode,
                            order=order,
                        )
                    )
                    for idx in multi
                ]
            )
            for idx, answer in zip(multi, answers, strict=True):
                for i, rate in zip(idx, answer.win_rates, strict=True):
                    values[i] = rate
                    errors[i] = (
                        None if rate is not None else "; ".join(answer.errors) or "no valid comparison"
                    )
    return values, errors, steps
