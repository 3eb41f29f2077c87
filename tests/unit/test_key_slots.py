"""Key layout 2: every key of a tenant hashes to one Redis Cluster slot, so every script referee runs
(each touches one tenant's keys) is single-slot, as Redis Cluster requires; tenants spread over
slots; the prefix is never the hash tag. Slots computed with redis-py's CRC16 (``redis.crc``)."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from referee.connection import _plain_url, is_cluster_url
from referee.connection import key_slot as referee_key_slot
from referee.keys import KEY_LAYOUT, Keys

TENANTS = ["anonymous", "team-a", "team-b", "t0", "a-very-long-tenant-name_with_parts-123"]
DIGEST = "ab" * 32


def slot(key: str) -> int:
    return key_slot(key.encode())


def every_key(keys: Keys) -> dict[str, str]:
    """Every key name of a tenant, by what it is."""
    return {
        "jobs": keys.jobs,
        "stream": keys.stream("job-1"),
        "other stream": keys.stream("another.job_2"),
        "reply": keys.reply("job-1", "req-1"),
        "result": keys.result("job-1", "req-1"),
        "dead letter": keys.dead_letter,
        "blob": keys.blob(DIGEST),
        "blob bytes": keys.blob_bytes,
        "health": keys.health("job-1"),
        "health jobs": keys.health_jobs,
        "limits copy": keys.tenant_limits,
    }


# What each script declares as KEYS and reads by name from ARGV (a script on a cluster may only touch
# keys of one slot, declared or not).
def script_keys(keys: Keys) -> dict[str, list[str]]:
    return {
        "SEND": [keys.stream("job-1"), keys.jobs, keys.tenant_limits, keys.streams_prefix + "job-2"],
        "BLOB": [keys.blob(DIGEST), keys.blob_bytes, keys.tenant_limits],
        "_REPLY_ONCE": [keys.result("job-1", "r"), keys.reply("job-1", "r")],
        "_DROP_IDLE_JOB": [keys.jobs, keys.stream("job-1")],
        "_DROP_UNLISTED": [keys.jobs, keys.stream("job-1")],
        "_ACK": [keys.stream("job-1")],
        "_READ (one tenant's streams)": [keys.stream("job-1"), keys.stream("job-2"), keys.stream("j3")],
        "_BOUNDED_GET": [keys.blob(DIGEST)],
        "resend check (EXISTS)": [keys.result("job-1", "r"), keys.reply("job-1", "r")],
    }


@pytest.mark.parametrize("tenant", TENANTS)
def test_every_key_of_a_tenant_is_in_one_slot(tenant):
    keys = Keys("referee", tenant)
    slots = {what: slot(name) for what, name in every_key(keys).items()}
    assert len(set(slots.values())) == 1, slots
    assert set(slots.values()) == {slot(keys.hash_tag)}


@pytest.mark.parametrize("tenant", TENANTS)
@pytest.mark.parametrize("prefix", ["referee", "rp", "team:queue.v2"])
def test_every_scripts_keys_hash_to_one_slot(tenant, prefix):
    keys = Keys(prefix, tenant)
    for script, names in script_keys(keys).items():
        assert len({slot(n) for n in names}) == 1, (script, names)
        assert all(n.startswith(keys.namespace) for n in names)


def test_the_hash_tag_is_the_tenant_not_the_prefix():
    keys = Keys("referee", "acme")
    assert keys.namespace == "referee:{t:acme}:" and keys.stream("j") == "referee:{t:acme}:requests:j"
    assert keys.hash_tag == "{t:acme}"
    # the same tenant under two prefixes: the same slot (the tag is the tenant's); no braces in prefixes
    assert slot(Keys("other", "acme").jobs) == slot(keys.jobs)
    with pytest.raises(ValueError):
        Keys("{referee}", "acme")
    assert referee_key_slot(keys.jobs) == slot(keys.jobs)


def test_tenants_spread_over_slots_and_shared_keys_are_their_own():
    tenants = [f"team-{i}" for i in range(64)]
    slots = {slot(Keys("referee", t).jobs) for t in tenants}
    assert len(slots) > 60  # not one slot for everyone (as a tag on the prefix would give)
    keys = Keys("referee")
    assert keys.limits == "referee:limits" and keys.judges == "referee:judges"
    assert keys.tenant_limits != keys.limits


def test_keys_name_their_tenant_back():
    keys = Keys("rp", "team-a")
    for name in every_key(keys).values():
        assert keys.tenant_of_key(name) == "team-a"
    assert keys.tenant_of_key("rp:limits") is None
    assert keys.tenant_of_key("rp:t:team-a:jobs") is None  # layout 1
    assert keys.tenant_of_key("other:{t:team-a}:jobs") is None
    assert keys.tenants_pattern == "rp:{t:*"
    assert KEY_LAYOUT == 2


def test_cluster_urls():
    assert is_cluster_url("redis+cluster://h:7000") and is_cluster_url("rediss+cluster://u:p@h:7000")
    assert not is_cluster_url("redis://h:6379/0")
    assert _plain_url("redis+cluster://u:p@h:7000/0", drop_login=True) == ("redis://h:7000", True)
    assert _plain_url("rediss://u:p@h:6379/2", drop_login=False) == ("rediss://u:p@h:6379/2", False)
    with pytest.raises(ValueError, match="one database"):
        _plain_url("redis+cluster://h:7000/3", drop_login=False)
    with pytest.raises(ValueError, match="scheme"):
        _plain_url("http://h:7000", drop_login=False)
