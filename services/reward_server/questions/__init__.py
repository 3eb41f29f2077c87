"""Questions: what each door asks of a judge, in the one shape the runner answers.

Every request, whatever door it came in by (a native route, ``/get_reward``, ``/classify``,
``/v1/*``, ``/verl/*``, ``/slime/*`` or a Redis message), becomes one of these. A question says
what it needs (which judge and what it must be able to do, how many items, which texts, which
media, what it costs in engine requests), how it runs on the judge once admitted, what it counts
in the metrics and how its answer is built. ``service.JudgeService.ask`` runs the one pipeline:

    choose the judge -> normalise content -> check limits -> the route's and the kind's own checks
    -> decode media -> admit (fair share, deadline, cost) -> run -> record metrics -> answer

so a limit, a metric or a cache rule added there reaches every door. Adapters only translate their
shapes into questions and the answers back.
"""

from .adapters import ClassifyAnswer, ClassifyQuestion, GenerateQuestion, chat_messages, split_queries
from .base import Cost, Outcome, Question, item_contents, normalise, prompt_texts
from .native import CotJudgeQuestion, PairwiseQuestion, ScoreQuestion, WinRateQuestion

__all__ = [
    "ClassifyAnswer",
    "ClassifyQuestion",
    "Cost",
    "CotJudgeQuestion",
    "GenerateQuestion",
    "Outcome",
    "PairwiseQuestion",
    "Question",
    "ScoreQuestion",
    "WinRateQuestion",
    "chat_messages",
    "item_contents",
    "normalise",
    "prompt_texts",
    "split_queries",
]
