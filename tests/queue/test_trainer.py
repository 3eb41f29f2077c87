"""GRPO with TRL against the real server: win-rate rewards through Redis, and two jobs sharing a judge."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from referee.keys import Keys
from tests.support import REDIS_URL, REPO


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory, embedded_dir):
    from tests.model_factory import make_tiny_policy

    return make_tiny_policy(tmp_path_factory.mktemp("models") / "tiny-policy", embedded_dir)


def _settings(tiny_policy_dir, tmp_path, redis_prefix, server_url, **overrides) -> dict:
    return {
        "policy": str(tiny_policy_dir),
        "max_prompts": 8,
        "max_steps": 2,
        "prompts_per_step": 2,
        "num_generations": 4,
        "max_completion_length": 12,
        "redis_url": REDIS_URL,
        "redis_prefix": redis_prefix,
        "server_url": server_url,
        "output_dir": str(tmp_path / "runs"),
        "judge_timeout_s": 300,
        **overrides,
    }


def _check_run(out, steps: int) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert (out / "reward_curve.png").stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps and summary["steps_per_minute"] > 0
    # Every group the judge saw is logged with its completions, and the summary counts the repeats.
    groups = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(groups) == steps * 2 and all(len(g["completions"]) == 4 for g in groups)
    repeats = sum(len(g["completions"]) - len(set(g["completions"])) for g in groups)
    assert summary["completions"] == steps * 8 and summary["duplicate_completions"] == repeats
    assert summary["duplicate_rate"] == pytest.approx(repeats / (steps * 8), abs=1e-4)
    return rows


def test_grpo_with_winrate_rewards_through_redis(tiny_policy_dir, tmp_path, redis_prefix, server_url):
    import redis

    from trainer.settings import TrainSettings
    from trainer.worker import run

    job = "grpo-queue"
    settings = TrainSettings(
        **_settings(
            tiny_policy_dir,
            tmp_path,
            redis_prefix,
            server_url,
            job_id=job,
            transport="queue",
            rewards=[{"kind": "winrate", "judge": "smollm2", "order": "single"}],
        )
    )
    rows = _check_run(run(settings), 2)
    for row in rows:
        assert 0.0 <= row["reward"] <= 1.0
        # Win rates of a full round robin average 1/2 per group: the batch's mean reward is 1/2
        # unless some comparisons were invalid.
        if row["judge/invalid"] == 0:
            assert row["reward"] == pytest.approx(0.5, abs=1e-6)
        assert row["judge/latency_s"] > 0
    r = redis.Redis.from_url(REDIS_URL)
    # The rewards travelled through Redis (the open tenant's namespace: this server has no keys).
    assert r.zscore(Keys(redis_prefix).jobs, job) is not None
    r.close()


@pytest.mark.parametrize(
    ("reward", "transport"),
    [
        ({"kind": "score", "judge": "tiny-rm"}, "http"),
        ({"kind": "preference", "judge": "smollm2", "order": "single"}, "http"),
        ({"kind": "winrate", "judge": "tiny-rm"}, "http"),
    ],
)
def test_grpo_with_each_reward_kind(tiny_policy_dir, tmp_path, redis_prefix, server_url, reward, transport):
    from trainer.settings import TrainSettings
    from trainer.worker import run

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": f"Name a colour, please ({k}).", "reference": "Blue."}) + "\n"
            for k in range(4)
        )
    )
    settings = TrainSettings(
        **_settings(
            tiny_policy_dir,
            tmp_path,
            redis_prefix,
            server_url,
            job_id=f"grpo-{reward['kind']}",
            transport=transport,
            prompts=prompts,
            rewards=[reward],
        )
    )
    rows = _check_run(run(settings), 2)
    assert all(isinstance(r["reward"], float) for r in rows)


def test_two_trainer_jobs_share_one_judge(tiny_policy_dir, tmp_path, redis_prefix, server_url):
    procs = []
    for job in ("shared-a", "shared-b"):
        config = tmp_path / f"{job}.yaml"
        config.write_text(
            yaml.safe_dump(
                _settings(
                    tiny_policy_dir,
                    tmp_path,
                    redis_prefix,
                    server_url,
                    job_id=job,
                    torch_threads=1,
                    rewards=[{"kind": "winrate", "judge": "smollm2", "order": "random"}],
                )
            )
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "trainer.cli", "--config", str(config)],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
            )
        )
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        assert "done: metrics" in out
    for job in ("shared-a", "shared-b"):
        _check_run(tmp_path / "runs" / job, 2)


def test_grpo_job_with_a_tenant_key_through_the_redis_acl(
    tiny_policy_dir, tmp_path, tenant_server, monkeypatch
):
    """A job of tenant team-b on a server with keys: its key (REFEREE_API_KEY) logs it in to Redis as
    its tenant's ACL user, and appears in none of the job's files."""
    import redis

    from trainer.settings import TrainSettings
    from trainer.worker import run

    key = tenant_server.keys["team-b"]
    monkeypatch.setenv("REFEREE_API_KEY", key)
    settings = TrainSettings(
        **_settings(
            tiny_policy_dir,
            tmp_path,
            tenant_server.prefix,
            tenant_server.url,
            job_id="keyed-job",
            transport="queue",
            max_steps=1,
            rewards=[{"kind": "score", "judge": "tiny-rm", "on_failure": "raise"}],
        )
    )
    assert settings.api_key.get_secret_value() == key
    out = run(settings)
    _check_run(out, 1)
    r = redis.Redis.from_url(tenant_server.redis_url)
    assert r.zscore(Keys(tenant_server.prefix, "team-b").jobs, "keyed-job") is not None  # as team-b
    r.close()
    for path in out.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path


async def test_worker_http_rewards_carry_the_key(tenant_server, monkeypatch):
    from trainer.settings import TrainSettings
    from trainer.worker import build_rewards

    prompts = [[{"role": "user", "content": "Name a colour."}]] * 2
    completions = [[{"role": "assistant", "content": c}] for c in ("Blue.", "Seven.")]
    rewards = [{"kind": "score", "judge": "tiny-rm", "on_failure": "raise"}]
    monkeypatch.setenv("REFEREE_API_KEY", tenant_server.keys["team-a"])
    settings = TrainSettings(
        job_id="keyed-http", transport="http", server_url=tenant_server.url, rewards=rewards
    )
    [reward], _ = build_rewards(settings)
    assert all(isinstance(v, float) for v in await reward(prompts=prompts, completions=completions))
    monkeypatch.delenv("REFEREE_API_KEY")
    [unkeyed], _ = build_rewards(settings.model_copy(update={"api_key": None}))
    from referee.trl import RewardUnavailable

    with pytest.raises(RewardUnavailable):  # refused (401), so no reward: never a made-up one
        await unkeyed(prompts=prompts, completions=completions)
