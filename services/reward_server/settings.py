"""Server settings: a YAML file plus ``REFEREE_*`` environment variables (pydantic-settings).

Precedence, highest first: constructor arguments, environment variables, the YAML file named by
``REFEREE_CONFIG`` (or ``--config``), defaults. Nested fields use ``__`` in environment variables,
for example ``REFEREE_LIMITS__MAX_ITEMS=64``. With no judges configured the server loads the
embedded SmolLM2 judge.
"""

from __future__ import annotations

import logging
import os
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.sources import YamlConfigSettingsSource

from referee.auth import RESERVED_TENANTS, TENANT_PATTERN, valid_hash
from referee.health import DEFAULT_WINDOW_S, DEFAULT_WINDOWS

# A judge's settings are its kind's (judges.registry); these are importable from here as before.
from .judge_settings import EngineJudgeSettings as EngineJudgeSettings
from .judge_settings import EngineSettings as EngineSettings
from .judge_settings import JudgeSettings as JudgeSettings
from .judges.generative import GenerativeSettings
from .judges.registry import AnyJudgeSettings
from .judges.registry import parse_judge_settings as parse_judge_settings

logger = logging.getLogger(__name__)

# Settings renamed so that each name says what it counts (engine requests or queue messages) and
# which wait it bounds. The old names are still read, in YAML, constructor arguments and REFEREE_*
# variables, with a DeprecationWarning and a logged warning that name the new one.
RENAMED: dict[str, dict[str, str]] = {
    "limits": {
        "max_inflight": "max_inflight_engine_requests",
        "max_waiting": "max_waiting_engine_requests",
        "max_queue_wait_s": "max_admission_wait_s",
    },
    "queue": {
        "max_inflight": "max_inflight_messages",
        "per_job_inflight": "per_job_inflight_messages",
        "per_tenant_inflight": "per_tenant_inflight_messages",
    },
}


def _renamed_message(section: str, old: str, new: str) -> str:
    return (
        f"{section}.{old} is deprecated and will be removed: it is now {section}.{new} "
        f"(REFEREE_{section.upper()}__{new.upper()} in the environment)"
    )


def new_names(section: str, data: Any) -> Any:
    """A section's mapping with its old option names (``RENAMED``) replaced by the new ones, each
    with a warning naming the new name. Both names of one option in one mapping is an error."""
    if not isinstance(data, dict) or not RENAMED[section].keys() & data.keys():
        return data
    data = dict(data)
    for old, new in RENAMED[section].items():
        if old not in data:
            continue
        if new in data:
            raise ValueError(f"{section}.{old} is the old name of {section}.{new}: give {new} only")
        message = _renamed_message(section, old, new)
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        logger.warning("%s", message)
        data[new] = data.pop(old)
    return data


def _old_name(section: str, old: str) -> property:
    """The attribute under its old name: the new one, read or set with a DeprecationWarning."""
    new = RENAMED[section][old]
    message = _renamed_message(section, old, new)

    def get(self: BaseModel) -> Any:
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        return getattr(self, new)

    def put(self: BaseModel, value: Any) -> None:
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        setattr(self, new, value)

    return property(get, put, doc=f"Deprecated: {section}.{new}.")


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_items: int = Field(256, ge=1, description="Items per /score, /pairwise or /judge request.")
    max_group_size: int = Field(64, ge=2, description="Responses per /winrate group.")
    max_text_chars: int = Field(32_000, ge=1, description="Characters per prompt or response.")
    max_request_chars: int = Field(
        2_000_000,
        ge=1,
        description="Characters of all the texts of one request together (prompts, responses, rubric, "
        "chat messages), whatever its route: the tokeniser's work one request can ask for.",
    )
    max_inflight_engine_requests: int = Field(
        4096, ge=1, description="Engine requests in the engines at once; more wait in the fair order."
    )
    max_waiting_engine_requests: int = Field(
        4096,
        ge=0,
        description="Engine requests of HTTP requests waiting for the engines; past it HTTP gets 429 "
        "(queued messages wait in their streams instead).",
    )
    tenant_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="With several tenants: the part of max_inflight_engine_requests a tenant without a "
        "max_inflight of its own may hold (a larger request gets 413), and the part of "
        "max_waiting_engine_requests each tenant's HTTP requests may take (then 429). Always: the part "
        "of the open gathered groups one tenant may hold. One half: whatever one tenant sends, the "
        "other half stays free for the others.",
    )
    max_open_groups: int = Field(
        10_000,
        ge=1,
        description="Gathered win rates (/slime/reward, /get_reward with group_size): groups waiting to "
        "fill up, all tenants together (429 past it); each tenant holds at most tenant_share of them.",
    )
    max_gathered_bytes: int = Field(
        256 << 20,
        ge=1024,
        description="One tenant's samples waiting for their groups to fill (gathered win rates: "
        "/slime/reward, /get_reward with group_size), prompt and response bytes in UTF-8; past it "
        "429. As media.tenant_blob_bytes: a bound on what one tenant makes the server hold.",
    )
    max_retries: int = Field(3, ge=0, description="Upper bound on a request's cot retries.")
    max_samples: int = Field(
        9, ge=1, description="Upper bound on a request's sampled cot judgments (samples)."
    )
    max_new_tokens: int = Field(2048, ge=1, description="Upper bound on a request's reasoning budget.")
    max_messages: int = Field(64, ge=1, description="Chat messages per prompt.")
    max_stop_strings: int = Field(
        16,
        ge=0,
        description="OpenAI-style requests: `stop` strings per request (vLLM checks every one of them on "
        "every generated token in the API process; OpenAI's own API allows 4).",
    )
    max_stop_chars: int = Field(256, ge=1, description="Characters of one `stop` string.")
    max_logprob_entries: int = Field(
        200_000,
        ge=1,
        description="OpenAI-style requests: n x max_tokens x (top log-probabilities + 1), the "
        "log-probability entries one answer may carry (each becomes a JSON object).",
    )
    max_request_cost: int = Field(
        4096,
        ge=1,
        description="Worst-case engine requests of one request (items or pairs x orders x (1 + retries)); "
        "larger requests get 413.",
    )
    max_body_bytes: int = Field(
        32 << 20, ge=1024, description="Request body size; larger bodies get 413 before any parsing."
    )
    max_admission_wait_s: float = Field(
        30.0,
        gt=0,
        description="Longest an HTTP request waits for admission to the engines (at most half its "
        "deadline); then 429. Not the Redis queue: queued messages wait in their streams.",
    )
    request_timeout_s: float = Field(
        900.0,
        gt=0,
        description="Deadline of an HTTP request (a client may ask for less with X-Request-Timeout); "
        "past it the request's engine work is cancelled and it gets 504.",
    )

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        return new_names("limits", data)

    max_inflight = _old_name("limits", "max_inflight")
    max_waiting = _old_name("limits", "max_waiting")
    max_queue_wait_s = _old_name("limits", "max_queue_wait_s")


class QueueSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    url: str = Field(
        default_factory=lambda: os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        description="Redis URL (default: $REDIS_URL).",
    )
    prefix: str = "referee"
    consumer_name: str | None = Field(None, description="Default: host name and process id.")
    read_count: int = Field(2, ge=1, description="Messages taken from each job's stream per read.")
    per_job_inflight_messages: int = Field(
        8, ge=1, description="A job's messages being judged in this consumer."
    )
    max_inflight_messages: int = Field(64, ge=1, description="All messages being judged in this consumer.")
    per_tenant_inflight_messages: int = Field(
        32,
        ge=1,
        description="A tenant's messages being judged in this consumer (all its jobs): no tenant can "
        "fill the consumer, e.g. with messages waiting on its own limits.",
    )
    max_jobs_per_tenant: int = Field(
        256,
        ge=1,
        description="Jobs a tenant may have active at once: the consumers poll its most recent ones "
        "only, and senders are refused a new job beyond it (published to Redis as max_jobs).",
    )
    block_ms: int = Field(
        50,
        ge=1,
        description="With nothing to read, the wait before reading again (reads run in a Redis script, "
        "which cannot block): a message sent to an idle consumer waits half of it on average, and an "
        "idle replica runs 1000/block_ms cheap reads a second.",
    )
    reclaim_idle_s: float = Field(60.0, gt=0, description="Pending this long without a heartbeat: reclaimed.")
    reclaim_every_s: float = Field(5.0, gt=0)
    max_deliveries: int = Field(3, ge=1, description="Failed deliveries before the dead-letter stream.")
    reply_ttl_s: int = Field(3600, ge=1)
    jobs_ttl_s: float = Field(
        86400.0,
        gt=0,
        description="Jobs silent this long are no longer polled; their empty streams are removed.",
    )
    # Faults and bounds
    socket_timeout_s: float = Field(
        10.0, gt=0, description="A Redis command that takes longer (beyond block_ms) is a Redis error."
    )
    reconnect_max_s: float = Field(5.0, gt=0, description="Longest wait between reconnection attempts.")
    max_backlog: int = Field(
        10_000,
        ge=1,
        description="Messages a job's stream may hold (waiting or being judged); a send beyond it fails "
        "with backlog_full. Published to Redis by the consumers, so senders need not be configured.",
    )
    max_message_bytes: int = Field(
        8 << 20,  # referee.scripts.DEFAULT_MAX_MESSAGE_BYTES, the send script's when none is published
        ge=64 << 10,
        description="A queued message's largest size (bytes of its JSON). Published to Redis: the send "
        "script refuses a larger one (413 too_large, before it is queued). One written into a stream "
        "by hand is never read: it is dead-lettered at its first delivery and its sender answered 413.",
    )
    dead_letter_maxlen: int = Field(10_000, ge=1, description="Entries kept in the dead-letter stream (~).")
    dead_letter_msg_chars: int = Field(
        4096, ge=64, description="A dead-lettered message's payload is cut to this many characters."
    )
    cleanup_every_s: float = Field(60.0, gt=0, description="Period of idle-job and dead-consumer cleanup.")
    dead_consumer_idle_s: float = Field(
        3600.0, gt=0, description="A group member idle this long with nothing pending is removed."
    )
    shutdown_grace_s: float = Field(
        20.0,
        ge=0,
        description="On shutdown, time left to messages being judged; unfinished ones are handed back to "
        "the group without costing a delivery. Keep it below the pod's terminationGracePeriodSeconds.",
    )

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        return new_names("queue", data)

    max_inflight = _old_name("queue", "max_inflight")
    per_job_inflight = _old_name("queue", "per_job_inflight")
    per_tenant_inflight = _old_name("queue", "per_tenant_inflight")


class TenantSettings(BaseModel):
    """A team sharing the judge: its keys (hashed), its share of the engine and its limits."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=TENANT_PATTERN, description="Also its Redis ACL user and key namespace.")
    keys: list[str] = Field(
        min_length=1,
        description="SHA-256 of each API key, 'sha256:<hex>' (`referee keys new` prints both); several "
        "keys let a key be rotated without downtime.",
    )
    weight: float = Field(1.0, gt=0, description="Its share of the engine relative to other busy tenants.")
    max_inflight: int | None = Field(
        None,
        ge=1,
        description="Engine requests in flight for this tenant; more waits (queue) or gets 429. Default: "
        "with several tenants, its share of the capacity (limits.tenant_share); alone, no limit.",
    )
    max_queued: int | None = Field(
        None, ge=1, description="Messages waiting in all of this tenant's job streams; more are refused."
    )
    tokens_per_minute: int | None = Field(
        None, ge=1, description="Prompt and completion tokens judged per minute; more waits or gets 429."
    )

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name in RESERVED_TENANTS:
            raise ValueError(f"{name!r} is reserved; choose another tenant name")
        return name

    @field_validator("keys")
    @classmethod
    def _hashed(cls, keys: list[str]) -> list[str]:
        for key in keys:
            if not valid_hash(key):
                raise ValueError(
                    "tenant keys are stored hashed: give 'sha256:<64 hex digits>' (`referee keys hash KEY` "
                    "prints it), never the key itself"
                )
        return keys


def read_tenants_file(path: Path) -> list[TenantSettings]:
    """A secrets file of tenants: ``tenants: [...]`` (YAML or JSON)."""
    if not path.is_file():
        raise FileNotFoundError(f"tenants file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not isinstance(data.get("tenants"), list):
        raise ValueError(f"tenants file {path} must hold a mapping with a list under 'tenants'")
    return [TenantSettings.model_validate(t) for t in data["tenants"]]


DEFAULT_JUDGE = GenerativeSettings(
    name="smollm2",
    model="embedded:smollm2",
    engine=EngineSettings(dtype="auto", max_model_len=4096, kv_cache_memory_gib=1.0),
)


class MediaSettings(BaseModel):
    """Images in requests: limits, formats and the upload store (``POST /blobs``)."""

    model_config = ConfigDict(extra="forbid")

    max_image_bytes: int = Field(16 << 20, ge=1024, description="One image file's size (413 above).")
    max_image_pixels: int = Field(
        4096 * 4096, ge=64, description="One image's width x height (413 above; decompression bombs)."
    )
    max_images: int = Field(64, ge=1, description="Distinct images in one request (413 above).")
    max_request_pixels: int = Field(
        64 << 20,
        ge=64,
        description="Pixels of one request's distinct images together (413 above), checked from their "
        "headers before anything is decoded: 64 Mi pixels are about 200 MB of RGB.",
    )
    max_decoded_pixels: int = Field(
        256 << 20,
        ge=64,
        description="Pixels of all admitted requests' decoded images together, held until each request "
        "is answered (about 768 MB of RGB by default); with several tenants, one tenant holds at most "
        "limits.tenant_share of it. A request that does not fit waits up to "
        "limits.max_admission_wait_s, then 429. At least max_request_pixels.",
    )
    formats: list[Literal["PNG", "JPEG", "WEBP"]] = Field(
        default_factory=lambda: ["PNG", "JPEG", "WEBP"], description="Accepted image formats (422 else)."
    )
    blob_ttl_s: float = Field(
        3600.0, gt=0, description="How long an uploaded image is kept after its last upload."
    )
    blob_store_bytes: int = Field(
        1 << 30,
        ge=1 << 20,
        description="In-process store (no queue): total bytes kept; the least recently used go first.",
    )
    tenant_blob_bytes: int = Field(
        256 << 20,
        ge=1 << 20,
        description="One tenant's uploads (bytes) within blob_ttl_s; 413 above.",
    )

    @model_validator(mode="after")
    def _decoded_holds_one_request(self) -> MediaSettings:
        if self.max_decoded_pixels < self.max_request_pixels:
            raise ValueError(
                f"media.max_decoded_pixels ({self.max_decoded_pixels}) is below media.max_request_pixels "
                f"({self.max_request_pixels}): a request within its own budget could never be decoded; "
                "raise max_decoded_pixels or lower max_request_pixels"
            )
        return self


class CacheSettings(BaseModel):
    """The judgment cache (``reward_server.cache``): deterministic engine answers by content."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    default: bool = Field(True, description="Whether a request that does not say (no `cache`) uses it.")
    max_entries: int = Field(100_000, ge=1, description="Answers kept in this process (LRU beyond).")
    ttl_s: float = Field(3600.0, gt=0, description="How long an answer is kept (here and in Redis).")
    shared: bool = Field(True, description="With the queue on: share answers between replicas in Redis.")


class HealthSettings(BaseModel):
    """Judge-health telemetry (``referee.health``): what the judge gave each job, per window."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    window_s: float = Field(
        DEFAULT_WINDOW_S, ge=1, description="The length of one window of figures (seconds)."
    )
    windows: int = Field(
        DEFAULT_WINDOWS, ge=1, le=1000, description="Windows kept per job (older ones expire)."
    )
    max_jobs: int = Field(
        1000, ge=1, description="Jobs whose figures this process keeps without Redis (least recent go)."
    )
    flush_every_s: float = Field(
        2.0, gt=0, description="With the queue on: how often tallies go to Redis (every replica adds)."
    )


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REFEREE_", env_nested_delimiter="__", extra="forbid")

    config: Path | None = Field(None, description="The YAML file these settings were read from.")
    judges: list[AnyJudgeSettings] = Field(
        default_factory=lambda: [DEFAULT_JUDGE],
        description="The judges served, each with its kind's options (see judges.registry).",
    )
    default_judge: str | None = Field(None, description="Default: the first judge listed.")
    limits: Limits = Field(default_factory=Limits)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    media: MediaSettings = Field(default_factory=MediaSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    cpu_binding: Literal["vllm", "all", "spread"] = Field(
        "spread",
        description="CPU build only: which cores each engine's worker is bound to. vllm: vLLM's "
        "default (one core per worker, the rest reserved); all: every worker on every core; "
        "spread: one engine on every core, several engines on disjoint cores. An engine's "
        "cpu_cores, or VLLM_CPU_OMP_THREADS_BIND in the environment, wins.",
    )
    tenants: list[TenantSettings] = Field(
        default_factory=list,
        description="Teams and their hashed keys. None: the server runs open (no keys), on loopback only.",
    )
    tenants_file: Path | None = Field(
        None, description="A secrets file of more tenants (``tenants: [...]``), e.g. a mounted Secret."
    )
    operators: list[str] = Field(
        default_factory=list,
        description="Tenants whose keys see every tenant's figures at /metrics (give the monitoring "
        "scraper its own tenant and key). Any other key sees the samples of its own tenant only.",
    )
    allow_open: bool = Field(
        False,
        description="Allow a server without tenants to bind a non-loopback address (anyone can use it).",
    )
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"

    @model_validator(mode="after")
    def _check_judges(self) -> ServerSettings:
        if not self.judges:
            raise ValueError("configure at least one judge")
        names = [j.name for j in self.judges]
        if len(set(names)) != len(names):
            raise ValueError(f"judge names must be unique, got {names}")
        for k, j in enumerate(self.judges):
            for m in j.members:
                if m not in names[:k]:
                    raise ValueError(
                        f"ensemble {j.name!r}: member {m!r} must be a judge listed before it "
                        f"(judges before it: {names[:k]})"
                    )
        if self.default_judge is None:
            self.default_judge = names[0]
        elif self.default_judge not in names:
            raise ValueError(f"default_judge {self.default_judge!r} is not one of {names}")
        if self.tenants_file is not None:
            self.tenants = [*self.tenants, *read_tenants_file(self.tenants_file)]
            self.tenants_file = None  # read once
        tenant_names = [t.name for t in self.tenants]
        if len(set(tenant_names)) != len(tenant_names):
            raise ValueError(f"tenant names must be unique, got {tenant_names}")
        hashes = [h for t in self.tenants for h in t.keys]
        if len(set(hashes)) != len(hashes):
            raise ValueError("the same key is given to two tenants (or twice to one)")
        unknown = [o for o in self.operators if o not in tenant_names]
        if unknown:
            raise ValueError(f"operators {unknown} are not configured tenants ({tenant_names})")
        return self

    @property
    def auth(self) -> bool:
        """Keys are required (some tenant is configured)."""
        return bool(self.tenants)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = settings_cls.model_config.get("yaml_file") or os.environ.get("REFEREE_CONFIG")
        if path:
            if not Path(path).is_file():
                raise FileNotFoundError(f"REFEREE_CONFIG={path} does not name a file")
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(_NewNames(source) for source in sources)


class _NewNames(PydanticBaseSettingsSource):
    """A settings source whose old option names (``RENAMED``) are read as the new ones before the
    sources are merged: a new name in one source and the old one in another then follow the
    sources' precedence (an environment variable over the YAML file) instead of clashing."""

    def __init__(self, source: PydanticBaseSettingsSource) -> None:
        super().__init__(source.settings_cls)
        self.source = source
        self.__name__ = type(source).__name__

    def _set_current_state(self, state: dict[str, Any]) -> None:
        self.source._set_current_state(state)

    def _set_settings_sources_data(self, states: dict[str, dict[str, Any]]) -> None:
        self.source._set_settings_sources_data(states)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.source.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        data = self.source()
        return {key: new_names(key, value) if key in RENAMED else value for key, value in data.items()}


def load_settings(config: Path | str | None = None, **overrides) -> ServerSettings:
    """Settings from ``config`` (or ``$REFEREE_CONFIG``), the environment and explicit overrides."""
    if config is None:
        return ServerSettings(**overrides)

    class FileSettings(ServerSettings):
        model_config = SettingsConfigDict(**{**ServerSettings.model_config, "yaml_file": str(config)})

    return FileSettings(config=config, **overrides)


@lru_cache
def get_settings() -> ServerSettings:
    return ServerSettings()
