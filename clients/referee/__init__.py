"""referee: the SDK of the referee judge service (HTTP clients, wire protocol, reward math).

Importing it pulls in neither torch nor vllm.
"""

from .client import (
    APIError,
    AsyncReferee,
    AuthenticationError,
    BacklogFull,
    BadRequest,
    Overloaded,
    PermissionDenied,
    QueueUnavailable,
    Referee,
    RefereeError,
    RefereeTimeout,
    RetryPolicy,
    StepRewardError,
    TransportError,
    Unavailable,
    UnknownJudge,
)
from .connection import connect
from .images import blob, image
from .protocol import (
    ImagePart,
    JudgeItem,
    JudgeRequest,
    JudgeResponse,
    JudgesResponse,
    Message,
    PairwiseItem,
    PairwiseRequest,
    PairwiseResponse,
    ScoreItem,
    ScoreRequest,
    ScoreResponse,
    Steps,
    WinRateRequest,
    WinRateResponse,
)
from .queue import QueueReferee
from .rewards import bradley_terry, group_advantages, win_rates
from .steps import StepReward, place_on_tokens

__version__ = "0.1.0"

__all__ = [
    "APIError",
    "AsyncReferee",
    "AuthenticationError",
    "BacklogFull",
    "BadRequest",
    "ImagePart",
    "JudgeItem",
    "JudgeRequest",
    "JudgeResponse",
    "JudgesResponse",
    "Message",
    "Overloaded",
    "PairwiseItem",
    "PairwiseRequest",
    "PairwiseResponse",
    "PermissionDenied",
    "QueueReferee",
    "QueueUnavailable",
    "Referee",
    "RefereeError",
    "RefereeTimeout",
    "RetryPolicy",
    "ScoreItem",
    "ScoreRequest",
    "ScoreResponse",
    "StepReward",
    "StepRewardError",
    "Steps",
    "TransportError",
    "Unavailable",
    "UnknownJudge",
    "WinRateRequest",
    "WinRateResponse",
    "__version__",
    "blob",
    "bradley_terry",
    "connect",
    "group_advantages",
    "image",
    "place_on_tokens",
    "win_rates",
]
