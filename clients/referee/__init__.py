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
    WinRateRequest,
    WinRateResponse,
)
from .queue import QueueReferee
from .rewards import bradley_terry, group_advantages, win_rates

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
    "win_rates",
]
