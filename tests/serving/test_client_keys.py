"""Clients carry their tenant's key to a real server with tenants (``tenant_server``): the SDK, the
async SDK and the TRL reward, verl's ``compute_score`` and the command line. Headers, errors and
the adapters are checked without a server in ``tests/unit/test_client_keys.py``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from referee import AsyncReferee, AuthenticationError, Referee
from referee.auth import ENV_KEY, new_key
from tests.support import QUESTION


@pytest.fixture(autouse=True)
def _no_key_in_env(monkeypatch):
    monkeypatch.delenv(ENV_KEY, raising=False)


def test_sdk_against_a_server_with_tenants(tenant_server):
    key = tenant_server.keys["team-a"]
    with Referee(tenant_server.url, api_key=key, job_id="keys-sdk") as ref:
        out = ref.score(judge="tiny-rm", items=[{"prompt": QUESTION, "response": "Paris."}])
        assert out.results[0].score is not None
        assert "tiny-rm" in [j.name for j in ref.judges().judges]
        assert ref.health()  # /readyz needs no key
    with Referee(tenant_server.url) as ref, pytest.raises(AuthenticationError) as info:
        ref.score(judge="tiny-rm", items=[{"prompt": QUESTION, "response": "Paris."}])
    assert info.value.status == 401
    wrong = new_key("team-a")
    with Referee(tenant_server.url, api_key=wrong) as ref, pytest.raises(AuthenticationError) as info:
        ref.judges()
    assert wrong not in str(info.value)


async def test_async_sdk_and_trl_reward_with_a_key(tenant_server):
    from referee.trl import winrate_reward

    key = tenant_server.keys["team-b"]
    async with AsyncReferee(tenant_server.url, api_key=key, job_id="keys-async") as ref:
        out = await ref.winrate(judge="tiny-rm", prompt=QUESTION, responses=["Paris.", "Lyon.", "Rome."])
        assert sum(out.win_rates) == pytest.approx(1.5)
    reward = winrate_reward(url=tenant_server.url, api_key=key, job_id="keys-trl", judge="tiny-rm")
    values = await reward(prompts=[QUESTION] * 3, completions=["Paris.", "Lyon.", "Rome."])
    assert sum(values) == pytest.approx(1.5)
    unkeyed = winrate_reward(url=tenant_server.url, judge="tiny-rm", on_failure="mask")
    assert await unkeyed(prompts=[QUESTION] * 3, completions=["Paris.", "Lyon.", "Rome."]) == [None] * 3


def test_verl_compute_score_takes_the_key_from_the_environment(tenant_server, monkeypatch):
    from referee.verl import compute_score

    kw = dict(
        data_sources=["d"] * 2,
        solution_strs=["Paris.", "Lyon."],
        ground_truths=["Paris"] * 2,
        extra_infos=[{"question": QUESTION}] * 2,
        url=tenant_server.url,
        judge="tiny-rm",
    )
    with pytest.raises(AuthenticationError):
        compute_score(**kw)
    monkeypatch.setenv(ENV_KEY, tenant_server.keys["team-a"])
    assert all(isinstance(s, float) for s in compute_score(**kw))


def test_cli_with_a_key_flag_or_environment(tenant_server):
    def referee(*args, key=None):
        env = {**os.environ, "REFEREE_URL": tenant_server.url, "COLUMNS": "200"}
        env.pop(ENV_KEY, None)
        if key:
            env[ENV_KEY] = key
        return subprocess.run(
            [sys.executable, "-m", "referee.cli", *args], capture_output=True, text=True, env=env, timeout=120
        )

    key = tenant_server.keys["team-c"]
    assert "tiny-rm" in referee("judges", key=key).stdout
    flag = referee(
        "score", "--judge", "tiny-rm", "--prompt", QUESTION, "--response", "Paris.", "--api-key", key
    )
    assert flag.returncode == 0 and "POST /score (tiny-rm)" in flag.stdout, flag.stderr
    refused = referee("judges")
    assert refused.returncode == 1 and "401" in refused.stdout and "Traceback" not in refused.stderr
    wrong = new_key("team-c")
    refused = referee("judges", "--api-key", wrong)
    assert refused.returncode == 1 and wrong not in refused.stdout + refused.stderr
