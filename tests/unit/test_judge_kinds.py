"""Judge kinds as data: each kind's own settings (a union discriminated on ``kind``), one registry,
and what a configured judge can be asked, read without an engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
import yaml
from pydantic import ValidationError

from referee.protocol import JudgeKind
from reward_server import judges
from reward_server.cli import settings_problems
from reward_server.judges import (
    KINDS,
    REGISTRY,
    RUNNERS,
    SETTINGS,
    ClassifierJudge,
    ClassifierSettings,
    EnsembleJudge,
    GenerativeJudge,
    Judge,
    JudgeSettings,
    capabilities,
    engine_key,
    parse_judge_settings,
)
from reward_server.settings import ServerSettings, load_settings

# Each kind with every option of its own set away from its default.
OWN_OPTIONS = {
    "classifier": {"activation": "sigmoid", "weights": {"helpfulness": 1.0}},
    "clip": {"logit_scale": 50.0},
    "generative": {
        "verdict_format": "answer_tag",
        "template": "unifiedreward_think",
        "listwise_group_size": 8,
        "scale_low": 0,
        "scale_high": 4,
        "top_logprobs": 5,
        "tie_margin": 0.05,
        "inconsistent": "average",
        "min_label_mass": 0.0,
        "cot_max_new_tokens": 64,
        "cot_temperature": 0.3,
        "sample_temperature": 0.9,
    },
    "followup": {"followups_positive": ["Thanks!"], "followups_negative": ["Wrong."]},
    "prm": {
        "step_separator": "<step>",
        "step_delimiter": "\n",
        "positive_label": 0,
        "aggregate": "last",
        "max_steps": 8,
        "system_prompt": "Reason step by step.",
    },
    "ensemble": {
        "members": ["a", "b"],
        "aggregate": "uncertainty",
        "uncertainty_penalty": 0.5,
        "tie_margin": 0.1,
        "inconsistent": "drop",
    },
}


def judge(kind: str, **options) -> dict:
    base = {"name": f"my-{kind}", "kind": kind}
    if kind != "ensemble":
        base["model"] = "some/model"
    return {**base, **options}


# ---------------------------------------------------------------- the settings of each kind


@pytest.mark.parametrize("kind", sorted(OWN_OPTIONS))
def test_each_kind_takes_its_own_options(kind):
    cfg = parse_judge_settings(judge(kind, transform="par", **OWN_OPTIONS[kind]))
    assert type(cfg) is SETTINGS[kind] and cfg.kind == kind and cfg.transform == "par"
    for option, value in OWN_OPTIONS[kind].items():
        assert getattr(cfg, option) == value
    assert set(OWN_OPTIONS[kind]) | {"name", "kind", "model", "transform"} <= set(type(cfg).model_fields)


def test_every_option_belongs_to_some_kind():
    """No kind's settings class has an option that the tests above do not give it."""
    shared = {"name", "kind", "model", "transform", "engine"}
    for kind, cls in SETTINGS.items():
        assert set(cls.model_fields) - shared == set(OWN_OPTIONS[kind]), kind


@pytest.mark.parametrize(
    ("kind", "option", "value", "owners"),
    [
        ("classifier", "tie_margin", 0.1, "ensemble and generative judges"),
        ("classifier", "members", ["x", "y"], "ensemble judges"),
        ("clip", "activation", "sigmoid", "classifier judges"),
        ("generative", "weights", {"a": 1.0}, "classifier judges"),
        ("followup", "min_label_mass", 0.0, "generative judges"),
        ("ensemble", "engine", {"dtype": "float32"}, "classifier, clip, followup, generative and prm judges"),
    ],
)
def test_an_option_of_another_kind_is_refused_naming_both(kind, option, value, owners):
    with pytest.raises(ValidationError) as caught:
        parse_judge_settings(
            judge(kind, **({"members": ["a", "b"]} if kind == "ensemble" else {}), **{option: value})
        )
    text = str(caught.value)
    assert f"judge 'my-{kind}': `{option}` is an option of {owners}, not of {kind} judges" in text
    assert f"The options of {kind} judges: name, kind, model" in text


def test_a_misspelt_option_is_refused_with_a_suggestion():
    with pytest.raises(
        ValidationError,
        match=r"`activaton` is not an option of classifier judges \(did you mean `activation`\?\)",
    ):
        parse_judge_settings(judge("classifier", activaton="sigmoid"))
    with pytest.raises(ValidationError, match="`colour` is not an option of any judge kind"):
        parse_judge_settings(judge("generative", colour="blue"))


def test_what_the_user_sees_from_a_config_file(tmp_path: Path):
    """``referee serve --config`` prints one line per problem (``settings_problems``): where it is
    and what is wrong, without pydantic's input dump and link."""
    path = tmp_path / "judges.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "judges": [
                    judge("classifier", tie_margin=0.1),
                    judge("generative"),
                    judge("gpt", model="m"),
                ]
            }
        )
    )
    with pytest.raises(ValidationError) as caught:
        load_settings(path)
    lines = settings_problems(caught.value).splitlines()
    assert lines == [
        "  judges.0.classifier: judge 'my-classifier': `tie_margin` is an option of ensemble and generative "
        "judges, not of classifier judges. The options of classifier judges: name, kind, model, transform, "
        "engine, activation, weights",
        "  judges.2: a judge's `kind` is one of classifier, generative, clip, ensemble, followup, prm",
    ]


def test_a_kind_is_required_and_known():
    for bad in ({"name": "j", "model": "m"}, {"name": "j", "kind": "gpt", "model": "m"}):
        with pytest.raises(ValidationError, match="a judge's `kind` is one of classifier, generative, clip"):
            parse_judge_settings(bad)


def test_the_shared_base_is_not_a_judges_settings():
    with pytest.raises(TypeError, match="ClassifierSettings"):
        JudgeSettings(name="j", kind="classifier", model="m")
    assert ClassifierSettings(name="j", model="m").kind == "classifier"  # each kind's class knows its kind


def test_engine_kinds_need_a_model_and_have_no_members():
    with pytest.raises(ValidationError, match="`model` is required for a classifier judge"):
        parse_judge_settings({"name": "c", "kind": "classifier"})
    for kind in ("classifier", "clip", "generative", "followup"):
        assert parse_judge_settings(judge(kind)).members == ()


def test_the_ensembles_members_rule():
    with pytest.raises(ValidationError, match="two or more distinct member"):
        parse_judge_settings(judge("ensemble", members=["a"]))
    with pytest.raises(ValidationError, match="two or more distinct member"):
        parse_judge_settings(judge("ensemble", members=["a", "a"]))
    with pytest.raises(ValidationError, match="members"):
        parse_judge_settings(judge("ensemble"))
    assert parse_judge_settings(judge("ensemble", members=["a", "b"])).model == "ensemble:a+b"
    a, b = judge("classifier", name="a"), judge("classifier", name="b")
    ensemble = judge("ensemble", members=["a", "b"])
    assert [j.name for j in ServerSettings(judges=[a, b, ensemble]).judges] == ["a", "b", "my-ensemble"]
    with pytest.raises(ValidationError, match="member 'b' must be a judge listed before it"):
        ServerSettings(judges=[a, ensemble, b])


def test_server_settings_take_mappings_instances_and_the_environment(monkeypatch):
    mixed = ServerSettings(judges=[ClassifierSettings(name="rm", model="m"), judge("generative")])
    assert [type(j).__name__ for j in mixed.judges] == ["ClassifierSettings", "GenerativeSettings"]
    monkeypatch.setenv(
        "REFEREE_JUDGES", '[{"name": "rm", "kind": "classifier", "model": "m", "activation": "sigmoid"}]'
    )
    assert ServerSettings().judges[0].activation == "sigmoid"
    monkeypatch.setenv(
        "REFEREE_JUDGES", '[{"name": "rm", "kind": "classifier", "model": "m", "tie_margin": 0.1}]'
    )
    with pytest.raises(ValidationError, match="`tie_margin` is an option of ensemble and generative"):
        ServerSettings()


def test_the_repositorys_judges_files_load():
    """Every judges list in the repository's YAML (configs, deploy, docker, benchmarks) is valid."""
    repo = Path(__file__).resolve().parents[2]
    found = 0

    def walk(node):
        nonlocal found
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "judges" and isinstance(value, list):
                    for j in value:
                        parse_judge_settings(j)
                        found += 1
                elif isinstance(value, str) and "judges:" in value:
                    walk(yaml.safe_load(value))  # a ConfigMap's embedded file
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for folder in ("configs", "deploy", "docker", "benchmarks"):
        for path in sorted((repo / folder).rglob("*.y*ml")):
            for doc in yaml.safe_load_all(path.read_text()):
                walk(doc)
    assert found >= 5


def test_settings_import_no_engine():
    code = (
        "import sys, reward_server.settings, reward_server.judges\n"
        "print(sorted(m for m in ('vllm', 'torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- the registry


def test_every_kind_is_registered_once_with_its_judge_and_settings():
    assert set(REGISTRY) == {"classifier", "clip", "generative", "followup", "ensemble", "prm"}
    for name, kind in REGISTRY.items():
        assert issubclass(kind.judge, Judge) and issubclass(kind.settings, JudgeSettings)
        assert KINDS[name] is kind.judge and SETTINGS[name] is kind.settings
        assert kind.judge.__module__ == kind.settings.__module__ == f"reward_server.judges.{name}"
    assert RUNNERS == {
        "classifier": "pooling",
        "clip": "pooling",
        "generative": "generate",
        "followup": "generate",
        "prm": "pooling",
    }
    assert set(judges.__all__) <= set(dir(judges))
    assert set(get_args(JudgeKind)) == set(REGISTRY)  # what the SDK reads in /judges


def test_capabilities_are_read_without_an_engine():
    configured = ServerSettings(
        judges=[
            judge("classifier", name="rm1"),
            judge("classifier", name="rm2"),
            judge("generative", name="llm"),
            judge("clip", name="pick"),
            judge("followup", name="fu"),
            judge("ensemble", name="rms", members=["rm1", "rm2"]),
            judge("ensemble", name="mixed", members=["rm1", "llm"]),
            judge("ensemble", name="nested", members=["rms", "fu"]),
        ]
    ).judges
    caps = {j.name: capabilities(j, configured) for j in configured}
    assert caps["rm1"].abilities == {"formatted_text"} and caps["rm1"].pointwise
    assert caps["llm"].abilities == {"chat"} and not caps["llm"].pointwise
    assert caps["llm"].routes == ("score", "pairwise", "judge", "winrate")
    assert caps["llm"].pairwise_modes == ("logprob", "cot") and "listwise" in caps["llm"].schedules
    assert caps["pick"].abilities == frozenset() and caps["fu"].abilities == frozenset()
    assert caps["rms"].pointwise and caps["rms"].routes == ("score", "pairwise", "winrate")
    assert caps["rms"].abilities == frozenset()  # an ensemble scores no formatted text itself
    assert not caps["mixed"].pointwise and caps["mixed"].pairwise_modes == ("logprob", "cot")
    assert "judge" not in caps["mixed"].routes and caps["mixed"].schedules == ("pairs",)
    assert caps["nested"].pointwise
    with pytest.raises(ValueError, match="members"):
        capabilities(configured[5])  # an ensemble's members must be given


def test_a_loaded_ensemble_reports_what_its_settings_say():
    """A loaded ensemble derives the same capabilities from its member judges as the registry does
    from their settings (members built without engines: only their class data is read)."""
    configured = ServerSettings(
        judges=[
            judge("classifier", name="rm"),
            judge("generative", name="llm"),
            judge("ensemble", members=["rm", "llm"]),
        ]
    ).judges
    members = [ClassifierJudge.__new__(ClassifierJudge), GenerativeJudge.__new__(GenerativeJudge)]
    loaded = EnsembleJudge(configured[2], members)
    assert loaded.capabilities == capabilities(configured[2], configured)
    assert (loaded.routes, loaded.pairwise_modes, loaded.pointwise) == (
        ("score", "pairwise", "winrate"),
        ("logprob", "cot"),
        False,
    )


def test_judges_on_one_model_share_an_engine_key():
    gen = parse_judge_settings(judge("generative", name="g"))
    follow = parse_judge_settings(judge("followup", name="f"))
    rm = parse_judge_settings(judge("classifier", name="r"))
    assert engine_key(gen) == engine_key(follow) != engine_key(rm)
    assert engine_key(parse_judge_settings(judge("ensemble", members=["g", "f"]))) is None
