"""The SDK imports light, exports what it says; settings come from YAML and the environment."""

import json
import subprocess
import sys
import types

import pytest
from pydantic import ValidationError

import referee


def test_importing_the_sdk_pulls_in_neither_torch_nor_vllm():
    heavy = ("torch", "vllm", "transformers", "reward_server")
    code = (
        f"import json, sys, referee, referee.cli; print(json.dumps([m for m in {heavy} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_all_is_explicit_and_complete():
    assert sorted(referee.__all__) == referee.__all__
    for name in referee.__all__:
        assert hasattr(referee, name), name
    public = {
        n
        for n in dir(referee)
        if not n.startswith("_") and not isinstance(getattr(referee, n), types.ModuleType)
    }
    assert public <= set(referee.__all__) | {"annotations"}


def test_settings_from_yaml_then_environment(tmp_path, monkeypatch):
    from reward_server.settings import load_settings

    path = tmp_path / "judges.yaml"
    path.write_text(
        "judges:\n"
        "  - {name: rm, kind: classifier, model: /models/rm, engine: {dtype: bfloat16}}\n"
        "  - {name: llm, kind: generative, model: embedded:smollm2}\n"
        "limits: {max_items: 10}\n"
    )
    monkeypatch.setenv("REFEREE_LIMITS__MAX_ITEMS", "12")
    monkeypatch.setenv("REFEREE_DEFAULT_JUDGE", "llm")
    s = load_settings(path)
    assert [j.name for j in s.judges] == ["rm", "llm"]
    assert s.judges[0].engine.dtype == "bfloat16"
    assert s.judges[0].activation == "none"  # raw logits unless asked
    assert s.limits.max_items == 12  # the environment wins over the file
    assert s.default_judge == "llm"


def test_default_settings_serve_the_embedded_judge(monkeypatch):
    from reward_server.settings import ServerSettings

    monkeypatch.delenv("REFEREE_CONFIG", raising=False)
    s = ServerSettings()
    assert s.default_judge == "smollm2" and s.judges[0].model == "embedded:smollm2"


@pytest.mark.parametrize(
    "yaml_text",
    [
        "judges: []\n",
        "judges:\n  - {name: a, kind: classifier, model: m}\n  - {name: a, kind: classifier, model: m}\n",
        "judges:\n  - {name: a, kind: oracle, model: m}\n",
        "default_judge: b\njudges:\n  - {name: a, kind: classifier, model: m}\n",
        "judges:\n  - {name: a, kind: classifier, model: m, engine: {dtyp: float32}}\n",
        "queue: {enabled: true, max_inflght: 8}\n",  # a typo in a queue setting
    ],
)
def test_bad_configuration_is_refused(tmp_path, monkeypatch, yaml_text):
    from reward_server.settings import load_settings

    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValidationError):
        load_settings(path)


def test_trainer_seed_flag_reaches_the_training_settings(monkeypatch, tmp_path):
    """``referee-trainer --seed 7`` trains with seed 7 (TRL's GRPOConfig takes settings.seed)."""
    from typer.testing import CliRunner

    import trainer.worker
    from trainer.cli import app

    seen = {}

    def fake_run(settings):
        seen["seed"] = settings.seed
        return tmp_path

    monkeypatch.setattr(trainer.worker, "run", fake_run)
    result = CliRunner().invoke(app, ["--seed", "7", "--job-id", "seeded"])
    assert result.exit_code == 0, result.output
    assert seen == {"seed": 7}


def test_allow_open_flag_becomes_the_allow_open_setting(monkeypatch):
    """``referee serve --allow-open`` and ``referee-server --allow-open`` reach
    ``ServerSettings.allow_open`` (the server refuses an open non-loopback bind without it)."""
    from typer.testing import CliRunner

    import reward_server.cli
    import reward_server.settings
    from referee.cli import app

    class Stop(Exception):
        pass

    seen = []

    def fake_load_settings(config=None, **overrides):
        seen.append(overrides)
        raise Stop

    monkeypatch.setattr(reward_server.settings, "load_settings", fake_load_settings)
    with pytest.raises(Stop):
        reward_server.cli.serve(None, "0.0.0.0", None, None, allow_open=True)
    with pytest.raises(Stop):
        reward_server.cli.serve(None, None, None, None)
    assert seen == [{"host": "0.0.0.0", "allow_open": True}, {}]

    calls = []
    monkeypatch.setattr(reward_server.cli, "serve", lambda *a, **kw: calls.append(kw))
    monkeypatch.setattr(sys, "argv", ["referee-server", "--allow-open"])
    reward_server.cli.main()
    monkeypatch.setattr(sys, "argv", ["referee-server"])
    reward_server.cli.main()
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--allow-open"])
    assert result.exit_code == 0, result.output
    assert calls == [{"allow_open": True}, {"allow_open": None}, {"allow_open": True}]


def test_tenant_settings_from_the_environment(tmp_path, monkeypatch):
    from referee.auth import hash_key, new_key
    from reward_server.settings import ServerSettings

    key = new_key("team-e")
    path = tmp_path / "tenants.yaml"
    path.write_text(f"tenants:\n  - name: team-e\n    keys: ['{hash_key(key)}']\n")
    monkeypatch.setenv("REFEREE_TENANTS_FILE", str(path))
    monkeypatch.setenv("REFEREE_ALLOW_OPEN", "1")
    s = ServerSettings()
    assert [t.name for t in s.tenants] == ["team-e"] and s.auth and s.allow_open
    assert key not in path.read_text()


def test_trainer_api_key_flag_and_environment_reach_the_settings(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import trainer.worker
    from trainer.cli import app

    seen = []
    monkeypatch.setattr(trainer.worker, "run", lambda s: seen.append(s) or tmp_path)
    monkeypatch.delenv("REFEREE_API_KEY", raising=False)
    for args, env in (
        (["--api-key", "rk.team-f.flag-key"], {}),
        ([], {"REFEREE_API_KEY": "rk.team-f.env-key"}),
    ):
        result = CliRunner().invoke(app, args, env=env)
        assert result.exit_code == 0, result.output
        assert "flag-key" not in result.output and "env-key" not in result.output
    assert [s.api_key.get_secret_value() for s in seen] == ["rk.team-f.flag-key", "rk.team-f.env-key"]
