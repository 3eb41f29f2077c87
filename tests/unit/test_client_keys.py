"""Clients carry their tenant's key: headers, errors, adapters, the command line, without a server.
What is claimed about serving is checked against a real server with tenants in
``tests/serving/test_client_keys.py``; ``redis-acl --apply`` against the real Redis in
``tests/queue/test_redis_acl.py``."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from referee import (
    AsyncReferee,
    AuthenticationError,
    PermissionDenied,
    Referee,
    RefereeError,
    RetryPolicy,
    TransportError,
)
from referee.auth import ENV_KEY, hash_key, new_key, tenant_of
from referee.cli import app
from tests.support import tenants_file

KEY = "rk.team-x.c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA"
JUDGES = {"default": "j", "judges": []}
SCORE = {"judge": "j", "results": [{"index": 0, "score": 1.0}], "usage": {}}


@pytest.fixture(autouse=True)
def _no_key_in_env(monkeypatch):
    monkeypatch.delenv(ENV_KEY, raising=False)


def _recorder(status: int = 200, body: dict | None = None, seen: list | None = None):
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, json=body if body is not None else JUDGES)

    return handler


# ---------------------------------------------------------------- headers


def test_sync_client_sends_key_and_job_on_every_request_and_retry():
    seen: list[httpx.Request] = []
    answers = iter([httpx.Response(503, json={"error": "loading", "message": "wait"})])

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return next(answers, None) or httpx.Response(200, json=JUDGES if request.method == "GET" else SCORE)

    with Referee(
        "http://referee",
        api_key=KEY,
        job_id="run-7",
        retry=RetryPolicy(backoff=0.001),
        transport=httpx.MockTransport(handler),
    ) as ref:
        ref.judges()  # a 503 first: retried
        ref.score(items=[{"prompt": "q", "response": "r"}])
        ref.health()
    assert [r.url.path for r in seen] == ["/judges", "/judges", "/score", "/readyz"]
    for request in seen:
        assert request.headers["Authorization"] == f"Bearer {KEY}"
        assert request.headers["X-Referee-Job"] == "run-7"


async def test_async_client_sends_key_and_job_and_defaults_to_the_environment(monkeypatch):
    seen: list[httpx.Request] = []
    monkeypatch.setenv(ENV_KEY, KEY)
    async with AsyncReferee(
        "http://referee", job_id="run-8", transport=httpx.MockTransport(_recorder(seen=seen))
    ) as ref:
        await ref.judges()
        await ref.health()
    assert {r.headers["Authorization"] for r in seen} == {f"Bearer {KEY}"}
    assert {r.headers["X-Referee-Job"] for r in seen} == {"run-8"}
    seen.clear()
    other = new_key("team-y")
    async with AsyncReferee(
        "http://referee", api_key=other, transport=httpx.MockTransport(_recorder(seen=seen))
    ) as ref:
        await ref.judges()  # an explicit key wins over the environment
    assert seen[0].headers["Authorization"] == f"Bearer {other}" and "X-Referee-Job" not in seen[0].headers


def test_no_key_sends_no_authorization_header():
    seen: list[httpx.Request] = []
    with Referee("http://referee", transport=httpx.MockTransport(_recorder(seen=seen))) as ref:
        ref.judges()
    assert "Authorization" not in seen[0].headers and "X-Referee-Job" not in seen[0].headers


# ---------------------------------------------------------------- refusals and secrecy


@pytest.mark.parametrize(
    ("status", "error", "exc"),
    [(401, "unauthorized", AuthenticationError), (403, "forbidden", PermissionDenied)],
)
def test_refusals_raise_auth_errors_at_once_without_the_key(status, error, exc):
    seen: list[httpx.Request] = []
    # A server that (wrongly) echoes the key: the SDK's message still never shows it.
    body = {"error": error, "message": f"key {KEY} is not allowed"}
    with (
        Referee(
            "http://referee", api_key=KEY, transport=httpx.MockTransport(_recorder(status, body, seen))
        ) as ref,
        pytest.raises(exc) as info,
    ):
        ref.judges()
    assert len(seen) == 1  # never retried
    assert info.value.status == status and info.value.code == error
    assert KEY not in str(info.value) and KEY not in info.value.message and "***" in info.value.message
    assert not issubclass(exc, (TransportError,)) and issubclass(exc, RefereeError)


async def test_async_refusal_is_not_retried():
    seen: list[httpx.Request] = []
    body = {"error": "unauthorized", "message": "a key is required"}
    async with AsyncReferee(
        "http://referee", transport=httpx.MockTransport(_recorder(401, body, seen))
    ) as ref:
        with pytest.raises(AuthenticationError, match="a key is required"):
            await ref.score(items=[{"prompt": "q", "response": "r"}])
    assert len(seen) == 1


def test_reprs_logs_and_transport_errors_never_show_the_key(caplog):
    caplog.set_level(logging.DEBUG)
    ref = Referee("http://127.0.0.1:9", api_key=KEY, job_id="j", retry=RetryPolicy(attempts=1))
    assert KEY not in repr(ref) and "rk.team-x.***" in repr(ref)
    assert KEY not in repr(ref._http.headers)  # httpx masks Authorization
    with pytest.raises(TransportError) as info:
        ref.judges()
    assert KEY not in str(info.value)
    ref.close()
    # A key in the URL path (/k/<key>/) is masked the same way.
    path_ref = Referee(f"http://127.0.0.1:9/k/{KEY}", retry=RetryPolicy(attempts=1))
    assert KEY not in repr(path_ref) and path_ref.url == "http://127.0.0.1:9/k/***"
    with pytest.raises(TransportError) as info:
        path_ref.judges()
    assert KEY not in str(info.value)
    path_ref.close()
    assert KEY not in caplog.text


def test_queue_errors_map_to_the_same_exceptions():
    from referee.client import api_error

    assert isinstance(api_error(401, "unauthorized", "no"), AuthenticationError)
    assert isinstance(api_error(403, "forbidden", "no"), PermissionDenied)


# ---------------------------------------------------------------- adapters pass the key on


def test_trl_and_verl_adapters_pass_the_key_and_job(monkeypatch):
    import referee.trl
    import referee.verl
    from referee.trl import score_reward
    from referee.verl import compute_score

    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=SCORE)

    class Recording(AsyncReferee):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, transport=httpx.MockTransport(handler), **kwargs)

    monkeypatch.setattr(referee.trl, "AsyncReferee", Recording)
    monkeypatch.setattr(referee.verl, "AsyncReferee", Recording)
    reward = score_reward(url="http://referee", api_key=KEY, job_id="grpo-1", sync=True)
    assert reward(prompts=["q"], completions=["r"]) == [1.0]
    assert compute_score(["d"], ["r"], [None], [{"question": "q"}], url="http://referee", api_key=KEY) == [
        1.0
    ]
    assert [r.headers["Authorization"] for r in seen] == [f"Bearer {KEY}"] * 2
    assert seen[0].headers["X-Referee-Job"] == "grpo-1"
    with pytest.raises(ValueError, match="client_factory"):
        score_reward(client_factory=lambda: None, api_key=KEY)


def test_trainer_settings_read_the_key_from_the_environment_and_hide_it(monkeypatch, tmp_path):
    import trainer.worker
    from trainer.settings import TrainSettings
    from trainer.worker import build_rewards

    monkeypatch.setenv(ENV_KEY, KEY)
    monkeypatch.setenv("API_KEY", "not-this-one")  # only REFEREE_API_KEY counts
    settings = TrainSettings(job_id="job-k", rewards=[{"kind": "score"}])
    assert settings.api_key.get_secret_value() == KEY
    assert KEY not in repr(settings) and KEY not in settings.model_dump_json()
    made = []

    class Fake:
        def __init__(self, *args, **kwargs):
            made.append((type(self).__name__, kwargs))

    monkeypatch.setattr(trainer.worker, "QueueReferee", type("QueueReferee", (Fake,), {}))
    monkeypatch.setattr(trainer.worker, "AsyncReferee", type("AsyncReferee", (Fake,), {}))

    async def build_clients(s):
        funcs, _ = build_rewards(s)
        # The reward function makes its client on first use: a failing call still makes one.
        with pytest.raises(AttributeError):
            await funcs[0](prompts=["q"], completions=["r"])

    asyncio.run(build_clients(settings))
    asyncio.run(build_clients(settings.model_copy(update={"transport": "http", "tenant": None})))
    (_, queue), (_, http) = made
    assert queue["api_key"] == KEY and queue["job_id"] == "job-k"
    assert http["api_key"] == KEY and http["job_id"] == "job-k"


# ---------------------------------------------------------------- the command line, offline


def test_keys_new_prints_the_key_once_its_hash_and_a_tenants_entry(tmp_path):
    result = CliRunner().invoke(app, ["keys", "new", "team-q"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    key = lines[0].removeprefix("key:").strip()
    assert tenant_of(key) == "team-q" and result.output.count(key) == 1
    assert lines[1].removeprefix("hash:").strip() == hash_key(key)
    snippet = result.output[result.output.index("tenants:") :]
    path = tmp_path / "tenants.yaml"
    path.write_text(snippet)
    from reward_server.settings import read_tenants_file

    [tenant] = read_tenants_file(path)
    assert tenant.name == "team-q" and tenant.keys == [hash_key(key)]
    as_json = json.loads(CliRunner().invoke(app, ["keys", "new", "team-q", "--json"]).output)
    assert as_json["hash"] == hash_key(as_json["key"]) and as_json["tenant"] == "team-q"
    bad = CliRunner().invoke(app, ["keys", "new", "Not A Tenant"])
    assert bad.exit_code != 0


def test_keys_hash_from_an_argument_or_standard_input():
    assert CliRunner().invoke(app, ["keys", "hash", KEY]).output.strip() == hash_key(KEY)
    assert CliRunner().invoke(app, ["keys", "hash"], input=KEY + "\n").output.strip() == hash_key(KEY)


def test_redis_acl_prints_the_acl_file(tmp_path, monkeypatch):
    from referee.acl import acl_rules

    path, _, tenants = tenants_file(tmp_path, ["team-p", "team-q"])
    monkeypatch.setenv("ACL_TEST_PASSWORD", "server-password-for-the-test")
    result = CliRunner().invoke(
        app,
        ["redis-acl", "--tenants", str(path), "--prefix", "rq", "--server-password-env", "ACL_TEST_PASSWORD"],
    )
    assert result.exit_code == 0, result.output
    expected = acl_rules(tenants, prefix="rq", server_password="server-password-for-the-test")
    assert result.stdout.splitlines() == expected
    assert "server-password-for-the-test" not in result.stdout  # only its hash
    kept = CliRunner().invoke(app, ["redis-acl", "--tenants", str(path), "--keep-default-user"])
    assert "user default off" not in kept.stdout and len(kept.stdout.splitlines()) == 2
    out = tmp_path / "users.acl"
    CliRunner().invoke(app, ["redis-acl", "--tenants", str(path), "--output", str(out)])
    assert out.read_text().splitlines()[0] == "user default off" and (out.stat().st_mode & 0o777) == 0o600
    # Keys instead of hashes are refused, with the way out.
    path.write_text(yaml.safe_dump({"tenants": [{"name": "team-p", "keys": [new_key("team-p")]}]}))
    refused = CliRunner().invoke(app, ["redis-acl", "--tenants", str(path)])
    assert refused.exit_code == 1 and "referee keys hash" in refused.output


def test_redis_acl_reads_tenants_with_only_the_client_package(tmp_path):
    """Without reward_server installed the command validates the file itself."""
    path, _, _ = tenants_file(tmp_path, ["team-p"])
    code = (
        "import sys; sys.modules['reward_server'] = None; sys.modules['reward_server.settings'] = None\n"
        "from referee.cli import app; app()"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "redis-acl", "--tenants", str(path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1].startswith("user team-p on")
    path.write_text("tenants:\n  - {name: default, keys: []}\n")
    out = subprocess.run(
        [sys.executable, "-c", code, "redis-acl", "--tenants", str(path)], capture_output=True, text=True
    )
    assert out.returncode == 1 and "reserved" in out.stdout + out.stderr


def test_every_server_command_takes_an_api_key():
    for command in ("judges", "score", "pairwise", "winrate", "eval"):
        result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert "--api-key" in result.output and "REFEREE_API_KEY" in result.output, command


def test_the_manifests_placeholder_redis_password_is_refused():
    """deploy/k8s ships `PLACEHOLDER-replace-with-...` as the server's Redis password: an ACL file
    made with it would let anyone who read the manifest consume every tenant's queue."""
    from pathlib import Path

    import yaml

    from referee.acl import server_rule

    manifest = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "reward-server.yaml"
    shipped = next(
        d["stringData"]["password"]
        for d in yaml.safe_load_all(manifest.read_text())
        if d and d.get("metadata", {}).get("name") == "referee-server-redis"
    )
    with pytest.raises(ValueError, match="placeholder"):
        server_rule(shipped)
    assert server_rule("a-random-url-safe-password").startswith("user referee-server on")
