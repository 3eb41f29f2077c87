"""Judges: a configured model and the questions it can answer.

``base``: what every kind shares (``Judge``, ``RequestContext``, ``Comparison``, ``Rating``, the
engine protocol); one module per kind, holding its ``Judge`` subclass and its settings class
(``classifier``, ``clip``, ``generative``, ``followup``, ``ensemble``); ``registry``: the kinds by
name, the configuration's union of their settings, and loading a configured judge.
"""

from ..engine_types import Completion, EngineDead
from ..judge_settings import EngineJudgeSettings, JudgeSettings
from .base import (
    Capabilities,
    Comparison,
    EngineAPI,
    Judge,
    JudgeConfigError,
    Rating,
    RequestContext,
    low_mass_error,
    verdict_from_probability,
)
from .classifier import ClassifierJudge, ClassifierSettings
from .clip import ClipJudge, ClipSettings, checkpoint_logit_scale
from .ensemble import EnsembleJudge, EnsembleSettings, aggregate_preferences, aggregate_rewards
from .followup import FOLLOWUPS_NEGATIVE, FOLLOWUPS_POSITIVE, FollowupJudge, FollowupSettings
from .generative import GenerativeJudge, GenerativeSettings
from .registry import (
    KINDS,
    REGISTRY,
    RUNNERS,
    SETTINGS,
    AnyJudgeSettings,
    Kind,
    capabilities,
    engine_key,
    load_judge,
    parse_judge_settings,
)

__all__ = [
    "FOLLOWUPS_NEGATIVE",
    "FOLLOWUPS_POSITIVE",
    "KINDS",
    "REGISTRY",
    "RUNNERS",
    "SETTINGS",
    "AnyJudgeSettings",
    "Capabilities",
    "ClassifierJudge",
    "ClassifierSettings",
    "ClipJudge",
    "ClipSettings",
    "Comparison",
    "Completion",
    "EngineAPI",
    "EngineDead",
    "EngineJudgeSettings",
    "EnsembleJudge",
    "EnsembleSettings",
    "FollowupJudge",
    "FollowupSettings",
    "GenerativeJudge",
    "GenerativeSettings",
    "Judge",
    "JudgeConfigError",
    "JudgeSettings",
    "Kind",
    "Rating",
    "RequestContext",
    "aggregate_preferences",
    "aggregate_rewards",
    "capabilities",
    "checkpoint_logit_scale",
    "engine_key",
    "load_judge",
    "low_mass_error",
    "parse_judge_settings",
    "verdict_from_probability",
]
