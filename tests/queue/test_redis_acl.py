"""``referee redis-acl --apply`` against the real Redis: the users it sets log in with their tenants'
keys and no other. The ACL file it prints is checked without Redis in ``tests/unit/test_client_keys.py``."""

from __future__ import annotations

import uuid

import pytest
from typer.testing import CliRunner

from referee.auth import ENV_KEY
from referee.cli import app
from tests.support import REDIS_URL, tenants_file


@pytest.fixture(autouse=True)
def _no_key_in_env(monkeypatch):
    monkeypatch.delenv(ENV_KEY, raising=False)


def test_redis_acl_apply_sets_users_that_log_in_with_their_keys(tmp_path):
    import redis

    from referee.acl import remove_users

    names = [f"cli-{uuid.uuid4().hex[:8]}", f"cli-{uuid.uuid4().hex[:8]}"]
    path, keys, _ = tenants_file(tmp_path, names)
    # --keep-default-user: this Redis is shared with the other tests.
    result = CliRunner().invoke(
        app,
        [
            "redis-acl",
            "--tenants",
            str(path),
            "--prefix",
            f"cli-{uuid.uuid4().hex[:6]}",
            "--server-password-env",
            "NO_SUCH_VARIABLE_SET",
            "--apply",
            REDIS_URL,
            "--keep-default-user",
        ],
    )
    admin = redis.Redis.from_url(REDIS_URL)
    try:
        assert result.exit_code == 0, result.output
        assert f"applied users: {', '.join(names)}" in result.stdout
        for name in names:
            user = redis.Redis.from_url(REDIS_URL, username=name, password=keys[name])
            assert user.ping()
            user.close()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(REDIS_URL, username=names[0], password=keys[names[1]]).ping()
        assert admin.ping()  # the default user is still on
    finally:
        remove_users(admin, names)
        admin.close()
