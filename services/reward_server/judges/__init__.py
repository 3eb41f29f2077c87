"""Judges: a configured model and the questions it can answer (see ``base``)."""

from .base import *  # noqa: F403
from .base import (  # noqa: F401
    _FLIP,
    _common_prefix,
    _completion_from_json,
    _completion_json,
    _describe,
    _spread,
)
