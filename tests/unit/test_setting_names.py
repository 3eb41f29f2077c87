"""Setting names that carry their unit: engine requests (limits) versus queue messages (queue), and
the admission wait versus the Redis queue. The old names are still read, in YAML, constructor
arguments and REFEREE_* variables, with a DeprecationWarning naming the new name."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from reward_server.settings import RENAMED, Limits, QueueSettings, ServerSettings, load_settings

RENAMES = [(section, old, new) for section, names in RENAMED.items() for old, new in names.items()]
MODELS = {"limits": Limits, "queue": QueueSettings}


def test_the_renamed_settings():
    assert RENAMED == {
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
    for section, old, new in RENAMES:
        fields = MODELS[section].model_fields
        assert new in fields and old not in fields


@pytest.mark.parametrize(("section", "old", "new"), RENAMES)
def test_the_new_name_is_read_without_a_warning(section, old, new):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = MODELS[section](**{new: 7})
        settings = ServerSettings(**{section: {new: 7}})
    assert getattr(model, new) == 7 and getattr(getattr(settings, section), new) == 7


@pytest.mark.parametrize(("section", "old", "new"), RENAMES)
def test_the_old_name_in_arguments_warns_naming_the_new_one(section, old, new):
    with pytest.warns(
        DeprecationWarning, match=rf"{section}\.{old} is deprecated.*it is now {section}\.{new}"
    ):
        model = MODELS[section](**{old: 7})
    assert getattr(model, new) == 7
    with pytest.warns(DeprecationWarning, match=rf"it is now {section}\.{new}"):
        settings = ServerSettings(**{section: {old: 7}})
    assert getattr(getattr(settings, section), new) == 7


@pytest.mark.parametrize(("section", "old", "new"), RENAMES)
def test_the_old_name_in_yaml_warns_and_is_logged(section, old, new, tmp_path: Path, caplog):
    path = tmp_path / "referee.yaml"
    path.write_text(yaml.safe_dump({section: {old: 7}}))
    with (
        caplog.at_level(logging.WARNING, "reward_server.settings"),
        pytest.warns(DeprecationWarning, match=rf"it is now {section}\.{new}"),
    ):
        settings = load_settings(path)
    assert getattr(getattr(settings, section), new) == 7
    assert any(f"it is now {section}.{new}" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("section", "old", "new"), RENAMES)
def test_the_old_name_in_the_environment_warns(section, old, new, monkeypatch):
    monkeypatch.setenv(f"REFEREE_{section.upper()}__{old.upper()}", "7")
    env_name = f"REFEREE_{section.upper()}__{new.upper()}"
    with pytest.warns(
        DeprecationWarning, match=rf"it is now {section}\.{new} \({env_name} in the environment\)"
    ):
        settings = ServerSettings()
    assert getattr(getattr(settings, section), new) == 7


@pytest.mark.parametrize(("section", "old", "new"), RENAMES)
def test_the_old_attribute_reads_and_sets_the_new_one(section, old, new):
    model = MODELS[section](**{new: 7})
    with pytest.warns(DeprecationWarning, match=rf"it is now {section}\.{new}"):
        assert getattr(model, old) == 7
    with pytest.warns(DeprecationWarning, match=rf"it is now {section}\.{new}"):
        setattr(model, old, 9)
    assert getattr(model, new) == 9


def test_both_names_in_one_place_is_an_error():
    with pytest.raises(
        ValidationError, match=r"limits\.max_inflight is the old name of limits\.max_inflight_engine_requests"
    ):
        Limits(max_inflight=1, max_inflight_engine_requests=2)


def test_an_environment_variable_overrides_the_file_under_either_name(tmp_path: Path, monkeypatch):
    """The old name is read per source, before the sources are merged: the environment still wins
    over the YAML file, whichever of the two names each uses."""
    path = tmp_path / "referee.yaml"
    path.write_text(yaml.safe_dump({"queue": {"per_job_inflight": 3}}))
    monkeypatch.setenv("REFEREE_QUEUE__PER_JOB_INFLIGHT_MESSAGES", "5")
    with pytest.warns(DeprecationWarning):
        assert load_settings(path).queue.per_job_inflight_messages == 5
    path.write_text(yaml.safe_dump({"queue": {"per_job_inflight_messages": 3}}))
    monkeypatch.delenv("REFEREE_QUEUE__PER_JOB_INFLIGHT_MESSAGES")
    monkeypatch.setenv("REFEREE_QUEUE__PER_JOB_INFLIGHT", "6")
    with pytest.warns(DeprecationWarning):
        assert load_settings(path).queue.per_job_inflight_messages == 6


def test_the_repositorys_files_use_the_new_names():
    """Loading the repository's server settings (deploy, configs, the k8s ConfigMap) warns of no old name."""
    repo = Path(__file__).resolve().parents[2]
    files = [repo / "deploy" / "judges.gpu.yaml", repo / "configs" / "judges.gpu.example.yaml"]
    configs = [yaml.safe_load(f.read_text()) for f in files]
    for doc in yaml.safe_load_all((repo / "deploy" / "k8s" / "reward-server.yaml").read_text()):
        if doc and doc.get("kind") == "ConfigMap":
            configs += [yaml.safe_load(v) for v in doc["data"].values() if "judges:" in v]
    assert len(configs) >= 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for config in configs:
            ServerSettings(**config)
