"""The judge kinds: each kind's name, its ``Judge`` class and its settings class, in one table.

A new kind is one module of this package (its ``Judge`` subclass and its ``JudgeSettings``
subclass, whose ``kind`` is a one-value Literal) and one line in ``REGISTRY``. Everything else
(``KINDS``, ``RUNNERS``, ``SETTINGS``, the configuration's discriminated union, what a configured
judge can be asked) is read from this table.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag, TypeAdapter

from ..judge_settings import JudgeSettings, kind_of
from .base import Capabilities, Judge, JudgeConfigError
from .classifier import ClassifierJudge, ClassifierSettings
from .clip import ClipJudge, ClipSettings
from .ensemble import EnsembleJudge, EnsembleSettings
from .followup import FollowupJudge, FollowupSettings
from .generative import GenerativeJudge, GenerativeSettings
from .prm import PRMJudge, PRMSettings


@dataclass(frozen=True)
class Kind:
    judge: type[Judge]
    settings: type[JudgeSettings]


REGISTRY: dict[str, Kind] = {
    "classifier": Kind(ClassifierJudge, ClassifierSettings),
    "generative": Kind(GenerativeJudge, GenerativeSettings),
    "clip": Kind(ClipJudge, ClipSettings),
    "ensemble": Kind(EnsembleJudge, EnsembleSettings),
    "followup": Kind(FollowupJudge, FollowupSettings),
    "prm": Kind(PRMJudge, PRMSettings),
}
for _name, _kind in REGISTRY.items():
    if kind_of(_kind.settings) != _name:
        raise TypeError(
            f"REGISTRY[{_name!r}]: {_kind.settings.__name__} configures {kind_of(_kind.settings)!r}"
        )

KINDS: dict[str, type[Judge]] = {name: k.judge for name, k in REGISTRY.items()}
SETTINGS: dict[str, type[JudgeSettings]] = {name: k.settings for name, k in REGISTRY.items()}
# The vLLM runner of each kind's engine; kinds without an engine of their own (ensembles) are absent.
RUNNERS: dict[str, str] = {name: k.judge.runner for name, k in REGISTRY.items() if k.judge.runner}


def _kind_tag(value: Any) -> str | None:
    return value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)


# A configured judge: the settings class of its `kind` (pydantic's discriminated union).
AnyJudgeSettings = Annotated[
    Union[tuple(Annotated[k.settings, Tag(name)] for name, k in REGISTRY.items())],  # noqa: UP007
    Discriminator(
        _kind_tag,
        custom_error_type="judge_kind",
        custom_error_message=f"a judge's `kind` is one of {', '.join(REGISTRY)}",
    ),
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(AnyJudgeSettings)


def parse_judge_settings(data: dict | JudgeSettings) -> JudgeSettings:
    """A judge's settings from a mapping (YAML, JSON), as the settings class of its ``kind``."""
    return _ADAPTER.validate_python(data)


def capabilities(settings: JudgeSettings, judges: Iterable[JudgeSettings] = ()) -> Capabilities:
    """What a configured judge can be asked, from the settings alone (no engine, nothing loaded).
    ``judges``: the server's configured judges, where an ensemble's members are found by name."""
    kind = KINDS[settings.kind]
    if not settings.members:
        return kind.kind_capabilities()
    by_name = {j.name: j for j in judges}
    missing = [m for m in settings.members if m not in by_name]
    if missing:
        raise ValueError(f"judge {settings.name!r}: members {missing} are not among the judges given")
    return kind.kind_capabilities([capabilities(by_name[m], judges) for m in settings.members])


def engine_key(settings: JudgeSettings) -> tuple | None:
    """Judges with the same key share one engine (one copy of the model in memory): the same model,
    runner and engine settings, e.g. a generative judge and a follow-up judge on the same LLM.
    None for a kind without an engine of its own (an ensemble)."""
    if settings.kind not in RUNNERS:
        return None
    return (settings.model, RUNNERS[settings.kind], settings.engine.model_dump_json())


def load_judge(
    settings: JudgeSettings,
    cpu_bind: str | None = None,
    loaded: dict[str, Judge] | None = None,
    placement: tuple[list[int], int] | None = None,
) -> Judge:
    """Start the engine for a configured judge (blocking: tens of seconds on a CPU), or reuse the
    engine of a judge in ``loaded`` with the same ``engine_key``. A kind without an engine of its
    own (an ensemble) starts none: it is made of the judges in ``loaded`` that it names.
    ``placement``: (GPUs, engines sharing them) from the memory plan, on GPUs."""
    loaded = loaded or {}
    kind = KINDS[settings.kind]
    if settings.kind not in RUNNERS:
        return kind(settings, [loaded[name] for name in settings.members])  # type: ignore[call-arg]
    remote = settings.engine.remote
    if remote is not None and remote.api == "chat" and settings.kind != "generative":
        from ..remote import chat_refusal  # before sharing an engine: api chat answers generative only

        raise JudgeConfigError(f"judge {settings.name!r}: {chat_refusal(settings.kind)}")
    key = engine_key(settings)
    shared = next((j.engine for j in loaded.values() if engine_key(j.settings) == key), None)
    if shared is not None:
        return kind(settings, shared)
    if settings.engine.remote is not None:  # the model runs elsewhere: no engine starts here
        from ..remote import RemoteEngine

        if RUNNERS[settings.kind] not in ("generate", "pooling") or settings.kind in ("clip", "prm"):
            raise JudgeConfigError(
                f"judge {settings.name!r}: a {settings.kind} judge cannot be remote (remote judges are "
                "generative, classifier and followup judges; they take no images)"
            )

        engine = RemoteEngine.start_remote(settings.model, settings.engine, RUNNERS[settings.kind])
        try:
            return kind(settings, engine)
        except Exception:
            engine.shutdown()
            raise
    from ..engine import Engine  # the one module that imports vLLM

    bind = settings.engine.cpu_cores or cpu_bind
    devices, sharing = placement or (None, 1)  # on GPUs: memory_plan's placement of this engine
    engine = Engine.start(
        settings.model,
        settings.engine,
        RUNNERS[settings.kind],
        cpu_bind=bind,
        devices=devices,
        engines_on_device=sharing,
    )
    try:
        return kind(settings, engine)
    except Exception:
        engine.shutdown()
        raise
