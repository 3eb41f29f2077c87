"""The settings every judge kind shares, and its engine's.

Imported by ``settings`` (the server's settings) and by each kind's module in ``judges`` (which
adds the kind's own options to ``JudgeSettings``), and importing neither: the server's settings
load without vLLM, torch or the judges' engines. A configured judge is one kind's subclass;
``judges.registry.parse_judge_settings`` reads a mapping by its ``kind``.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RemoteSettings(BaseModel):
    """A judge whose engine already runs elsewhere: OpenAI-compatible servers (``vllm serve``,
    SGLang, referee's own ``/v1``) answer it; referee keeps tokenising, templating, debiasing,
    caching and sharing fairly (``reward_server.remote``)."""

    model_config = ConfigDict(extra="forbid")

    urls: list[str] = Field(
        min_length=1,
        description="Base URLs of the servers (without /v1), one per backend; requests are spread "
        "over the healthy ones.",
    )
    served_model: str | None = Field(
        None, description="The model name the servers serve (their /v1/models). Default: the judge's model."
    )
    api_key_env: str | None = Field(
        None, description="An environment variable holding the servers' key (sent as a bearer token)."
    )
    max_concurrency: int = Field(64, ge=1, description="Requests in flight to one backend.")
    timeout_s: float = Field(120.0, gt=0, description="One request's time limit at a backend.")
    retries: int = Field(
        3,
        ge=0,
        description="Further tries of a request that failed in a way safe to retry (connection error, "
        "timeout, 429, 5xx), on another backend where there is one; never a 4xx.",
    )
    backoff_s: float = Field(0.2, ge=0, description="The first retry's wait; doubled each time, with jitter.")
    failures_to_open: int = Field(
        3, ge=1, description="Consecutive failures that take a backend out (its circuit opens)."
    )
    open_s: float = Field(
        5.0, gt=0, description="How long a backend stays out before a health check may bring it back."
    )
    requests_per_minute: float | None = Field(
        None, gt=0, description="Hosted APIs: requests sent per minute, all backends together."
    )
    tokens_per_minute: float | None = Field(
        None, gt=0, description="Hosted APIs: prompt and completion tokens per minute, all backends together."
    )
    priorities: bool = Field(
        False,
        description="Send fair-share priorities (the servers must run --scheduling-policy priority, "
        "else they refuse any priority but 0).",
    )
    cache_salt: bool = Field(
        True, description="Send per-tenant prefix-cache salts (vLLM); off for servers that refuse the field."
    )
    api: Literal["completions", "chat"] = Field(
        "completions",
        description="completions: token ids to /v1/completions (vLLM, SGLang), referee's own templates "
        "and tokenisation. chat: chat messages to /v1/chat/completions, for hosted APIs that take "
        "only messages (the server applies its own chat template; labels are read from the top "
        "log-probabilities by token text); generative judges only.",
    )
    affinity: bool = Field(
        True,
        description="Keep one request's calls (a /winrate group, one queued message) on one backend, "
        "chosen by rendezvous hashing, for its prefix cache; off: each call to the least busy backend.",
    )
    affinity_max_skew: int = Field(
        32,
        ge=0,
        description="A request's backend is passed over for the least busy one while it has more than "
        "this many calls in flight beyond the least busy backend's.",
    )
    health_interval_s: float = Field(
        2.0,
        gt=0,
        description="How often a background task health-checks the backends that are out (once their "
        "open_s has passed), so that a backend comes back without traffic.",
    )


class EngineSettings(BaseModel):
    """vLLM engine arguments that deployments tune. Anything else goes in ``extra``."""

    model_config = ConfigDict(extra="forbid")

    remote: RemoteSettings | None = Field(
        None,
        description="Answer this judge with servers that already run the model (its tokenizer still "
        "loads here from `model`); the vLLM arguments below are then the servers' business.",
    )

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="auto: on the CPU build bfloat16 where the processor has native bf16 (AVX512-BF16 "
        "or AMX), float32 elsewhere; on accelerators the model's own dtype. An explicit value wins.",
    )
    max_model_len: int = Field(4096, ge=64)
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Fraction of accelerator memory (of host RAM on the CPU build). Default: the "
        "platform's (0.1 of host RAM on the CPU build; on a GPU 0.9 divided among the engines placed "
        "on it).",
    )
    kv_cache_memory_gib: float | None = Field(
        None, gt=0, description="Fixed KV-cache size; overrides gpu_memory_utilization when set."
    )
    tensor_parallel_size: int = Field(1, ge=1)
    gpus: list[int] | None = Field(
        None,
        min_length=1,
        description="GPUs this engine runs on (indices into the visible GPUs, as many as "
        "tensor_parallel_size). Default: engines spread over the visible GPUs.",
    )
    enforce_eager: bool | None = Field(
        None,
        description="CUDA graphs off. Default: the platform's (true on the CPU build, false on a GPU).",
    )
    enable_prefix_caching: bool | None = Field(None, description="Default: on for generative judges.")
    max_num_seqs: int | None = Field(None, ge=1)
    max_num_batched_tokens: int | None = Field(
        None,
        ge=16,
        description="Tokens per engine step (vLLM's chunked-prefill budget). A newly arrived request, "
        "however high its fair-share priority, waits for the step in progress, so small steps keep a "
        "shared judge fair. Default: 256 on the CPU build (a small job beside a 10x flood waited "
        "2.4x its latency alone at 256 against 13-15x at vLLM's 2048, for 14-16% of saturated "
        "throughput; BENCHMARKS.md, step budget) for generative judges, vLLM's own for pooling models "
        "and on GPUs (a GPU step takes milliseconds).",
    )
    seed: int = 0
    cpu_cores: str | None = Field(
        None,
        pattern=r"^(auto|nobind|[0-9,\-|]+)$",
        description="CPU build only: this engine's VLLM_CPU_OMP_THREADS_BIND (e.g. '0-1'); "
        "default: the server's cpu_binding policy.",
    )
    scheduling_policy: Literal["priority", "fcfs"] = Field(
        "priority", description="priority: queued jobs are served in fair-share order inside the engine."
    )
    extra: dict = Field(default_factory=dict, description="Passed to vLLM's AsyncEngineArgs as is.")


# Options that several kinds read, declared by each kind that reads them with these types.
TieMargin = Annotated[
    float, Field(ge=0, lt=0.5, description="Logprob verdicts: |P(A) - 1/2| <= margin is a tie.")
]
InconsistentRule = Annotated[
    Literal["tie", "average", "drop"],
    Field(
        description="order=both: a pair whose verdict changes with the order is a tie (MT-Bench, "
        "JudgeLM), is decided by the averaged probability (average), or is invalid and left out of "
        "win rates (drop). A request's `inconsistent` wins."
    ),
]


class JudgeSettings(BaseModel):
    """What every judge kind has: a name, a kind, a model, and the shaping of its /score rewards.

    Not a judge's settings by itself: each kind's settings class (``judges.registry.SETTINGS``)
    adds the options that kind reads, and an option a kind does not read is an error naming the
    option and the kind, never silently ignored.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    kind: str = Field(
        description="classifier: a sequence-classification reward model (one logit, or several named "
        "objectives). generative: an instruction-tuned (vision-)language model judging through "
        "prompts. clip: a CLIP-style dual encoder scoring an image against the prompt's text "
        "(PickScore, HPS): logit_scale x cosine. ensemble: other judges of this file combined, with "
        "their disagreement reported. followup: an instruction-tuned model's likelihood of a "
        "satisfied versus a dissatisfied follow-up from the user, as a pointwise reward."
    )
    model: str | None = Field(
        None,
        description="A local folder, a hub id (where a network exists), or embedded:smollm2. Not for "
        "an ensemble (its members have models).",
    )
    transform: Literal["none", "par", "log_sigmoid"] = Field(
        "none",
        description="/score: the shaping applied against an item's reference when the request names "
        "none (see ScoreRequest.transform).",
    )

    @model_validator(mode="before")
    @classmethod
    def _kind_options_only(cls, data: Any) -> Any:
        if cls is JudgeSettings:
            raise TypeError(
                "JudgeSettings holds what every judge kind shares; configure a judge with its kind's "
                "settings (e.g. ClassifierSettings) or judges.parse_judge_settings({...})"
            )
        if isinstance(data, dict):
            unknown = [key for key in data if key not in cls.model_fields]
            if unknown:
                raise ValueError(foreign_options(cls, data.get("name"), unknown))
        return data


class EngineJudgeSettings(JudgeSettings):
    """A kind that runs a model of its own, on an engine that judges of the same model, runner and
    engine settings share."""

    members: ClassVar[tuple[str, ...]] = ()  # made of no other judges (an ensemble is)
    engine: EngineSettings = Field(default_factory=EngineSettings)

    @model_validator(mode="after")
    def _model_given(self) -> EngineJudgeSettings:
        if self.model is None:
            raise ValueError(f"judge {self.name!r}: `model` is required for a {self.kind} judge")
        return self


def kind_of(cls: type[JudgeSettings]) -> str | None:
    """The kind a settings class configures (its ``kind: Literal[...]``), None for a shared base."""
    values = get_args(cls.model_fields["kind"].annotation)
    return values[0] if len(values) == 1 else None


def _kinds() -> dict[str, type[JudgeSettings]]:
    found: dict[str, type[JudgeSettings]] = {}
    todo = list(JudgeSettings.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        kind = kind_of(cls)
        if kind is not None:
            found.setdefault(kind, cls)
    return found


def foreign_options(cls: type[JudgeSettings], name: Any, unknown: list[str]) -> str:
    """The load error for options a kind does not have: which kinds do have them, and the kind's own."""
    kind = kind_of(cls) or cls.__name__
    own = list(cls.model_fields)
    others = _kinds()
    notes = []
    for option in unknown:
        where = sorted(k for k, c in others.items() if k != kind and option in c.model_fields)
        close = difflib.get_close_matches(option, own, n=1)
        if where:
            kinds = " and ".join([", ".join(where[:-1]), where[-1]] if len(where) > 1 else where)
            notes.append(f"`{option}` is an option of {kinds} judges, not of {kind} judges")
        elif close:
            notes.append(f"`{option}` is not an option of {kind} judges (did you mean `{close[0]}`?)")
        else:
            notes.append(f"`{option}` is not an option of any judge kind")
    who = f"judge {name!r}" if isinstance(name, str) else f"a {kind} judge"
    return f"{who}: {'; '.join(notes)}. The options of {kind} judges: {', '.join(own)}"
