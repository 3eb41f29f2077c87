"""A training job's settings: a YAML file plus ``REFEREE_TRAIN_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.sources import YamlConfigSettingsSource

from referee.defaults import DEFAULT_PREFIX, DEFAULT_REDIS_URL, DEFAULT_URL

REPO_DATA = Path(__file__).resolve().parents[2] / "data" / "mt_bench_prompts.jsonl"


class RewardSettings(BaseModel):
    """One reward function; several are mixed with their weights (TRL's ``reward_weights``)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["winrate", "score", "preference"] = "winrate"
    weight: float = 1.0
    judge: str | None = None
    mode: Literal["logprob", "cot"] = "logprob"
    order: Literal["single", "random", "both"] = "both"
    opponents: int | None = None
    soft: bool = False
    rubric: str | None = None
    reference_column: str = "reference"
    inconsistent: Literal["tie", "average", "drop"] | None = Field(
        None, description="order=both: the rule for pairs whose verdict flips (default: the judge's)."
    )
    on_failure: Literal["mask", "raise", "group_mean"] | float = Field(
        "group_mean",
        description="What a completion the judge could not score gets (see referee.trl): the group "
        "mean of this reward (neutral), None (TRL leaves it out only if every reward is None), an "
        "error, or a given value.",
    )


class TrainSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="REFEREE_TRAIN_", env_nested_delimiter="__", extra="forbid", populate_by_name=True
    )

    job_id: str = Field("job-1", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    policy: str = Field(
        "embedded:smollm2", description="Policy model: local folder, hub id or embedded:smollm2."
    )
    prompts: Path = Field(
        REPO_DATA, description="JSONL with a `prompt` field (and optional reference column)."
    )
    max_prompts: int | None = Field(None, ge=1)
    transport: Literal["queue", "http"] = Field("queue", description="How rewards reach the judge.")
    judge_report: bool = Field(
        True,
        description="Read the judge's health report of this job at every logged step (its figures go "
        "in metrics.jsonl under judge/health/, its warnings are printed once, the last report is "
        "written to judge_report.json).",
    )
    redis_url: str | None = Field(None, description=f"Default: $REDIS_URL or {DEFAULT_REDIS_URL}.")
    redis_prefix: str = DEFAULT_PREFIX
    server_url: str = DEFAULT_URL
    api_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("REFEREE_API_KEY", "REFEREE_TRAIN_API_KEY"),
        description="The tenant's API key ($REFEREE_API_KEY; keep it out of YAML files): sent to the "
        "server (http) or used as the tenant's Redis password (queue). Never logged or written out.",
    )
    tenant: str | None = Field(
        None,
        description="The tenant's Redis user (queue). Default: read from an rk.<tenant>.<secret> key.",
    )
    judge_timeout_s: float = 600.0
    rewards: list[RewardSettings] = Field(default_factory=lambda: [RewardSettings()])
    output_dir: Path = Path("runs")
    log_completions: bool = Field(
        True,
        description="Write each step's groups to completions.jsonl in the job's folder, and the share "
        "of duplicate completions inside groups to summary.json.",
    )

    # GRPO (TRL) settings, kept small enough for a CPU by default.
    max_steps: int = Field(4, ge=1)
    prompts_per_step: int = Field(2, ge=1)
    num_generations: int = Field(4, ge=2, description="Completions per prompt: the win-rate group.")
    max_completion_length: int = Field(32, ge=1)
    micro_batch_prompts: int = Field(
        1,
        ge=1,
        description="Prompts per forward/backward pass; the step accumulates prompts_per_step of them.",
    )
    optim: str = Field("adamw_torch", description="transformers optimizer name (adafactor saves memory).")
    learning_rate: float = 1e-6
    temperature: float = 1.0
    beta: float = 0.0
    seed: int = 0
    use_cpu: bool = True
    torch_threads: int | None = Field(None, ge=1, description="Cap torch's CPU threads (jobs sharing cores).")

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
        if settings_cls.model_config.get("yaml_file"):
            sources.append(YamlConfigSettingsSource(settings_cls))
        return tuple(sources)


def load_train_settings(config: Path | None = None, **overrides) -> TrainSettings:
    if config is None:
        return TrainSettings(**overrides)

    class FileSettings(TrainSettings):
        model_config = SettingsConfigDict(**{**TrainSettings.model_config, "yaml_file": str(config)})

    return FileSettings(**overrides)
