"""Tenants on the queue: Redis ACL users from ``referee.acl``, one key namespace per tenant.

Part 1 runs on the shared Redis alone (no vLLM): ACL users applied from ``acl_rules`` on a prefix of
the test's own (and user names of its own: ACL users are global to the Redis), a consumer logged in
as the server's user with a stand-in judge, and tenants' ``QueueReferee``s logged in as their
users. The tests that empty Redis' script cache (``SCRIPT FLUSH``) run on a ``redis-server`` of
their own, never the shared one. The attacks of one tenant on the others (messages too large or
not UTF-8, keys of the wrong type, filling Redis: on a redis-server of its own) are caused for real,
as the attacker's own Redis user, against a running consumer (RELIABILITY.md has their counts before
and after). Part 2 runs against ``tenant_server`` (a real server with keys, tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import time
import uuid
from types import SimpleNamespace

import httpx
import pytest
import redis as redis_sync
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError as RedisAuthenticationError
from redis.exceptions import NoPermissionError, NoScriptError, ResponseError

from referee import (
    AuthenticationError,
    BacklogFull,
    BadRequest,
    PermissionDenied,
    QueueUnavailable,
    ScoreItem,
    ScoreRequest,
)
from referee.acl import TENANT_COMMANDS, acl_rules, apply_acl, remove_users
from referee.auth import hash_key, new_key
from referee.keys import KEY_LAYOUT, Keys
from referee.protocol import JudgesResponse, QueueMessage, ScoreResponse, ScoreResult, Usage
from referee.queue import QueueReferee
from referee.scripts import DEFAULT_MAX_MESSAGE_BYTES, SEND_SHA, TENANT_SCRIPTS, sha1
from reward_server.consumer import QueueConsumer
from reward_server.settings import MediaSettings, QueueSettings, TenantSettings
from tests.support import MAX_TRIES_IN_1_5_S, REDIS_URL, OwnRedis, Tries

FAST = {"block_ms": 20, "reclaim_every_s": 0.1, "cleanup_every_s": 0.2, "reclaim_idle_s": 2.0}


def _items(*responses: str) -> list[ScoreItem]:
    return [ScoreItem(prompt="q", response=r) for r in responses]


def _url_with_login(user: str, password: str) -> str:
    return REDIS_URL.replace("redis://", f"redis://{user}:{password}@", 1)


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch):
    monkeypatch.delenv("REFEREE_API_KEY", raising=False)


# ---------------------------------------------------------------- part 1: the rules themselves


def test_rules_give_each_tenant_its_own_namespace_and_nothing_else():
    key_a, key_a2, key_b = new_key("team-a"), new_key("team-a"), new_key("team-b")
    tenants = [
        {"name": "team-a", "keys": [hash_key(key_a), hash_key(key_a2)]},
        TenantSettings(name="team-b", keys=[hash_key(key_b)]),  # objects with .name/.keys work too
    ]
    rules = acl_rules(tenants, prefix="rp", server_password="s3cret")
    assert rules[0] == "user default off"
    server = rules[1].split()
    assert server[:3] == ["user", "referee-server", "on"] and "~rp:*" in server and "-@all" in server
    root, *selectors = rules[2].split(" (")
    a = root.split()
    assert a[:3] == ["user", "team-a", "on"] and "resetchannels" in a
    assert f"#{hash_key(key_a).removeprefix('sha256:')}" in a and f"#{hash_key(key_a2)[7:]}" in a
    assert [t for t in a if "~" in t] == ["~rp:{t:team-a}:*", "%R~rp:limits", "%R~rp:judges"]
    assert a.index("-@all") < a.index("+evalsha") and "+@all" not in a and "+eval" not in a
    assert {t[1:] for t in a if t.startswith("+")} == set(TENANT_COMMANDS)
    # Writes: each command on the keys the senders' scripts write it to, nowhere else.
    assert selectors == [
        "~rp:{t:team-a}:requests:* +xadd)",
        "~rp:{t:team-a}:jobs +zadd)",
        "~rp:{t:team-a}:blob:* +set +pexpire)",
        "~rp:{t:team-a}:blob-bytes +incrby +pexpire)",
    ]
    assert not {"xadd", "zadd", "set", "incrby", "pexpire", "del", "rpush"} & set(TENANT_COMMANDS)
    # Scripts: EVALSHA of cached scripts only; nothing that loads or runs a script of its own.
    assert "+evalsha" in a
    assert not [
        t for t in a if t.startswith("+") and t[1:].split("|")[0] in ("script", "eval", "function", "fcall")
    ]
    assert not [t for t in a if t.startswith("+@") or t.startswith("+eval_") or t.startswith("+fcall")]
    assert not [t for t in " ".join(selectors).split() if t.startswith("+@") or "eval" in t]
    assert "+script|load" in server and "+script|exists" in server
    assert key_a not in " ".join(rules)  # the key itself never appears
    assert acl_rules(tenants, disable_default=False)[0].startswith("user team-a ")
    with pytest.raises(ValueError, match="hashed"):
        acl_rules([{"name": "team-a", "keys": [key_a]}])  # a plaintext key
    with pytest.raises(ValueError, match="not valid"):
        acl_rules([{"name": "Team:A*", "keys": [hash_key(key_a)]}])
    with pytest.raises(ValueError, match="twice"):
        acl_rules([tenants[0], tenants[0]])
    with pytest.raises(ValueError, match="glob"):
        acl_rules(tenants, prefix="rp*")


def test_keys_stay_in_their_namespace():
    keys = Keys("p", "team-a")
    assert keys.stream("job-1") == "p:{t:team-a}:requests:job-1"
    assert keys.reply("job-1", "r1") == "p:{t:team-a}:reply:job-1:r1"
    assert keys.result("job-1", "r1") == "p:{t:team-a}:result:job-1:r1"
    assert keys.dead_letter == "p:{t:team-a}:dead-letter" and keys.jobs == "p:{t:team-a}:jobs"
    assert keys.limits == "p:limits" and keys.judges == "p:judges"
    assert keys.job_from_stream(keys.stream("job-1")) == "job-1"
    assert Keys().stream("j") == "referee:{t:anonymous}:requests:j"
    for bad in ("a:b", "*", "a?", "[x]", "", "x" * 129, "a b"):
        with pytest.raises(ValueError):
            keys.reply("job-1", bad)
        with pytest.raises(ValueError):
            keys.stream(bad)
    with pytest.raises(ValueError):
        Keys("p", "team:a")


# ---------------------------------------------------------------- part 1: ACL users on the real Redis


class TenantEcho:
    """A stand-in judge for a server with tenants: /score answers the length of each response."""

    ready = True
    load_error = None

    def __init__(self, tenants: list[TenantSettings], media: MediaSettings | None = None) -> None:
        self.settings = SimpleNamespace(tenants=tenants, media=media or MediaSettings())
        self.asked: list[tuple[str, str, bool]] = []

    def describe(self) -> JudgesResponse:
        return JudgesResponse(default="echo", judges=[])

    async def score(self, request, *, tenant: str, job: str, queued: bool = False) -> ScoreResponse:
        self.asked.append((tenant, job, queued))
        results = [ScoreResult(index=i, score=len(it.response)) for i, it in enumerate(request.items)]
        return ScoreResponse(judge="echo", results=results, usage=Usage())


@pytest.fixture()
def acl_world():
    """Two tenants (and a third with max_queued 2) with ACL users on a prefix of their own, and
    the server's user; everything removed afterwards."""
    tag = uuid.uuid4().hex[:6]
    prefix = f"referee-test-acl-{tag}"
    names = {k: f"tx{k}-{tag}" for k in ("a", "b", "c")}
    keys = {k: new_key(name) for k, name in names.items()}
    tenants = [
        TenantSettings(name=names["a"], keys=[hash_key(keys["a"])]),
        TenantSettings(name=names["b"], keys=[hash_key(keys["b"])]),
        TenantSettings(name=names["c"], keys=[hash_key(keys["c"])], max_queued=2),
    ]
    server_user, server_password = f"referee-server-{tag}", uuid.uuid4().hex
    admin = redis_sync.Redis.from_url(REDIS_URL, decode_responses=True)
    rules = acl_rules(
        tenants,
        prefix=prefix,
        server_password=server_password,
        server_user=server_user,
        disable_default=False,
    )
    users = apply_acl(admin, rules)
    assert users == [server_user, *names.values()]
    for source in TENANT_SCRIPTS.values():  # as a consumer would on connect (tenants cannot)
        admin.script_load(source)
    world = SimpleNamespace(
        prefix=prefix,
        names=names,
        keys=keys,
        tenants=tenants,
        admin=admin,
        server_url=_url_with_login(server_user, server_password),
        users=users,
    )
    try:
        yield world
    finally:
        remove_users(admin, users)
        stale = list(admin.scan_iter(f"{prefix}:*", count=1000))
        if stale:
            admin.delete(*stale)
        admin.close()


def _denials(admin, users) -> list[dict]:
    """ACL LOG entries (refused commands, keys or logins) of these users."""
    return [e for e in admin.execute_command("ACL", "LOG", "128") if e["username"] in users]


def _tenant_client(world, k: str) -> redis_sync.Redis:
    return redis_sync.Redis.from_url(
        REDIS_URL, username=world.names[k], password=world.keys[k], decode_responses=True
    )


@contextlib.asynccontextmanager
async def consuming(world, service, prepare=None, **settings):
    """A consumer logged in as the server's user, consuming; ``prepare(consumer)`` runs before it
    starts; ``settings`` override the queue settings."""
    settings = QueueSettings(
        url=world.server_url, prefix=world.prefix, consumer_name="c1", **{**FAST, **settings}
    )
    consumer = QueueConsumer(service, settings)
    if prepare is not None:
        prepare(consumer)
    task = asyncio.create_task(consumer.run())
    try:
        deadline = time.monotonic() + 10
        while consumer.state != "consuming":
            assert time.monotonic() < deadline, consumer.status()
            await asyncio.sleep(0.02)
        yield consumer
    finally:
        await consumer.stop(drain_s=1)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_a_tenant_cannot_read_or_write_another_tenants_keys(acl_world):
    w = acl_world
    kb = Keys(w.prefix, w.names["b"])
    # B's secrets: a request on its stream and an answer waiting in its reply list.
    w.admin.xadd(kb.stream("job"), {"msg": "B's prompt"})
    w.admin.rpush(kb.reply("job", "r1"), "B's answer")
    a = _tenant_client(w, "a")
    try:
        refused = [
            lambda: a.xrange(kb.stream("job")),
            lambda: a.xread({kb.stream("job"): "0"}),
            lambda: a.xlen(kb.stream("job")),
            lambda: a.get(kb.reply("job", "r1")),
            lambda: a.blpop([kb.reply("job", "r1")], timeout=0.1),
            lambda: a.lrange(kb.reply("job", "r1"), 0, -1),
            lambda: a.rpush(kb.reply("job", "r1"), "forged"),
            lambda: a.xadd(kb.stream("job"), {"msg": "forged"}),
            lambda: a.zadd(kb.jobs, {"job": 1}),
            lambda: a.hset(kb.limits, "max_backlog", 10**9),  # shared: read-only
            lambda: a.set(kb.judges, "{}"),
            lambda: a.delete(kb.stream("job")),
            lambda: a.keys("*"),
            lambda: a.scan(0),
            lambda: a.execute_command("ACL", "WHOAMI"),
            lambda: a.publish("chan", "x"),
        ]
        for command in refused:
            with pytest.raises(NoPermissionError):
                command()
        # Lua runs with the caller's rights: a cached script given a key of B's as an argument
        # (a tenant cannot load one: loaded here by the default user) is refused that key too.
        peek = w.admin.script_load("return redis.call('XRANGE', ARGV[1], '-', '+')")
        with pytest.raises(ResponseError, match="can't access"):
            a.evalsha(peek, 0, kb.stream("job"))
        # Nothing of B's changed.
        assert w.admin.lrange(kb.reply("job", "r1"), 0, -1) == ["B's answer"]
        assert [f["msg"] for _, f in w.admin.xrange(kb.stream("job"))] == ["B's prompt"]
        # Its own namespace and the shared keys it may use.
        ka = Keys(w.prefix, w.names["a"])
        assert a.ping()
        entry = a.xadd(ka.stream("job"), {"msg": "mine"})
        assert a.xrange(ka.stream("job"), entry, entry)
        assert a.xlen(ka.stream("job")) == 1 and a.zadd(ka.jobs, {"job": 1}) == 1
        assert a.zscore(ka.jobs, "job") == 1 and a.exists(ka.reply("job", "r")) == 0
        assert a.blpop([ka.reply("job", "r")], timeout=0.05) is None
        assert a.hget(ka.limits, "max_backlog") is None and a.get(ka.judges) is None
    finally:
        a.close()


def test_a_tenant_cannot_load_or_run_scripts_of_its_own(acl_world):
    """A Lua script or function blocks Redis while it runs (``while true do end``: every tenant
    waits until SCRIPT KILL): a tenant may only EVALSHA scripts already cached."""
    w = acl_world
    ka = Keys(w.prefix, w.names["a"])
    a = _tenant_client(w, "a")
    harmless = "return 1"  # what a hostile tenant would send is a busy loop; the rights are the same
    library = "#!lua name=referee_test_lib\nredis.register_function('f', function() return 1 end)"
    try:
        refused = [
            lambda: a.script_load(harmless),
            lambda: a.eval(harmless, 0),
            lambda: a.execute_command("EVAL_RO", harmless, 0),
            lambda: a.execute_command("FUNCTION", "LOAD", library),
            lambda: a.execute_command("FUNCTION", "LIST"),
            lambda: a.execute_command("FCALL", "f", 0),
            lambda: a.execute_command("FCALL_RO", "f", 0),
            lambda: a.script_flush(),
            lambda: a.script_kill(),
            lambda: a.script_exists(SEND_SHA),
        ]
        for command in refused:
            with pytest.raises(NoPermissionError):
                command()
        assert w.admin.script_exists(sha1(harmless)) == [False]
        # EVALSHA runs what is cached, nothing else.
        with pytest.raises(NoScriptError):
            a.evalsha(sha1(f"return '{uuid.uuid4().hex}'"), 0)
        # The send script (cached by the fixture, as a consumer does) runs as the tenant.
        added = a.evalsha(
            SEND_SHA, 2, ka.stream("j"), ka.jobs, "{}", 5, "j", time.time(), w.names["a"], 0,
            ka.streams_prefix, ka.tenant_limits, KEY_LAYOUT,
        )  # fmt: skip
        assert added[0] == 1 and a.xlen(ka.stream("j")) == 1
    finally:
        a.close()


def test_wrong_keys_are_refused(acl_world):
    w = acl_world
    with pytest.raises(RedisAuthenticationError):
        redis_sync.Redis.from_url(REDIS_URL, username=w.names["a"], password=w.keys["b"]).ping()
    with pytest.raises(RedisAuthenticationError):
        redis_sync.Redis.from_url(REDIS_URL, username=w.names["a"], password="rk.nope.nope").ping()


async def test_queue_referee_maps_redis_refusals_to_401_and_403(acl_world, monkeypatch):
    w = acl_world
    request = ScoreRequest(items=_items("r"))
    wrong = f"rk.{w.names['a']}.not-the-key"
    async with QueueReferee(REDIS_URL, job_id="j", prefix=w.prefix, api_key=wrong, timeout=30) as q:
        sends = Tries(monkeypatch, q._redis, "evalsha")
        checks = Tries(monkeypatch, q._redis, "hget")  # the key layout check before a first send
        with pytest.raises(AuthenticationError) as err:
            await q.send("score", request)
        assert sends.count + checks.count == 1  # refused at once, not retried until the timeout
        assert err.value.status == 401 and "not-the-key" not in str(err.value)
    # B's key presented as user A (tenant= overrides the key's own): refused too.
    async with QueueReferee(
        REDIS_URL, job_id="j", prefix=w.prefix, api_key=w.keys["b"], tenant=w.names["a"], timeout=30
    ) as q:
        with pytest.raises(AuthenticationError):
            await q.send("score", request)
    # The right key on a prefix that is not its own: logged in, but every key refused.
    async with QueueReferee(REDIS_URL, job_id="j", prefix="elsewhere", api_key=w.keys["a"], timeout=30) as q:
        with pytest.raises(PermissionDenied) as err:
            await q.send("score", request)
        assert err.value.status == 403 and "elsewhere:{t:" in err.value.message
        with pytest.raises(PermissionDenied):
            await q.judges()
    with pytest.raises(ValueError, match="tenant="):
        QueueReferee(REDIS_URL, job_id="j", api_key="not-an-rk-key")
    # A key against consumers that serve no tenants (auth=0): its streams would never be read.
    w.admin.hset(f"{w.prefix}:limits", "auth", 0)
    async with QueueReferee(REDIS_URL, job_id="j", prefix=w.prefix, api_key=w.keys["a"]) as q:
        with pytest.raises(AuthenticationError, match="without tenants"):
            await q.send("score", request)


async def test_tenants_are_served_apart_through_their_acl_users(acl_world):
    """A consumer logged in as the server's user serves both tenants; each tenant, logged in as its
    own user, gets its own answers, even when it reuses the other's request id; neither the
    tenants nor the consumer are refused anything along the way (ACL LOG)."""
    w = acl_world
    w.admin.execute_command("ACL", "LOG", "RESET")
    service = TenantEcho(w.tenants)
    async with (
        consuming(w, service) as consumer,
        QueueReferee(REDIS_URL, job_id="run", prefix=w.prefix, api_key=w.keys["a"], lost_check_s=0.1) as qa,
        QueueReferee(REDIS_URL, job_id="run", prefix=w.prefix, api_key=w.keys["b"], lost_check_s=0.1) as qb,
    ):
        assert consumer.tenants == [t.name for t in w.tenants] and consumer.auth
        assert qa.tenant == w.names["a"] and not qa.open
        assert await qa.health() and (await qb.judges()).default == "echo"
        assert (await qa.score(items=_items("aaa"))).results[0].score == 3
        # The same request id from both tenants, same job name: two requests, two answers.
        rid = uuid.uuid4().hex
        await qb.send("score", ScoreRequest(items=_items("bb")), request_id=rid)
        await qa.send("score", ScoreRequest(items=_items("aaaaa", "a")), request_id=rid)
        got_b, got_a = await asyncio.gather(qb.receive("score", rid), qa.receive("score", rid))
        assert [r.score for r in got_b.results] == [2]
        assert [r.score for r in got_a.results] == [5, 1]
        await asyncio.sleep(0.5)  # reclaim, heartbeat, backlog and cleanup have run as the server
        assert consumer.state == "consuming", consumer.status()
    assert {(t, j, q) for t, j, q in service.asked} == {
        (w.names["a"], "run", True),
        (w.names["b"], "run", True),
    }
    assert _denials(w.admin, w.users) == []


async def test_a_message_naming_another_job_is_refused_in_its_streams_namespace(acl_world):
    w = acl_world
    service = TenantEcho(w.tenants)
    ka = Keys(w.prefix, w.names["a"])
    a = Redis.from_url(REDIS_URL, username=w.names["a"], password=w.keys["a"], decode_responses=True)
    rid = uuid.uuid4().hex
    forged = QueueMessage(
        type="score",
        job_id="other-job",  # not the stream's job
        request_id=rid,
        sent_at=time.time(),
        body=ScoreRequest(items=_items("x")).model_dump(),
    )
    try:
        async with consuming(w, service):
            await a.xadd(ka.stream("mine"), {"msg": forged.model_dump_json()})
            await a.zadd(ka.jobs, {"mine": time.time()})
            async with QueueReferee(REDIS_URL, job_id="mine", prefix=w.prefix, api_key=w.keys["a"]) as q:
                with pytest.raises(PermissionDenied, match="names job 'other-job'") as err:
                    await q.receive("score", rid, timeout=10)
                assert err.value.status == 403 and err.value.code == "wrong_job"
        assert service.asked == []  # not judged
        assert not await a.exists(ka.reply("other-job", rid), ka.result("other-job", rid))
        assert await a.xlen(ka.stream("mine")) == 0  # acknowledged
    finally:
        await a.aclose()


async def test_a_sender_without_a_key_fails_fast_when_keys_are_required(acl_world, monkeypatch):
    w = acl_world
    async with consuming(w, TenantEcho(w.tenants)):
        pass  # announced auth=1
    assert w.admin.hget(f"{w.prefix}:limits", "auth") == "1"
    async with QueueReferee(REDIS_URL, job_id="j", prefix=w.prefix, timeout=60) as q:  # default user
        assert q.tenant == "anonymous" and q.open
        sends = Tries(monkeypatch, q._redis, "evalsha")
        with pytest.raises(AuthenticationError, match="REFEREE_API_KEY"):
            await q.score(items=_items("r"))
        assert sends.count == 1  # the send script's answer: fails at once, not retried
    assert not w.admin.exists(Keys(w.prefix).stream("j"))  # nothing was queued


async def test_dead_letters_go_to_the_tenants_own_stream(acl_world):
    w = acl_world
    ka, kb = Keys(w.prefix, w.names["a"]), Keys(w.prefix, w.names["b"])
    a = Redis.from_url(REDIS_URL, username=w.names["a"], password=w.keys["a"], decode_responses=True)
    try:
        async with consuming(w, TenantEcho(w.tenants)):
            await a.xadd(ka.stream("junk"), {"msg": "{not json"})
            await a.zadd(ka.jobs, {"junk": time.time()})
            for _ in range(200):
                if w.admin.xlen(ka.dead_letter):
                    break
                await asyncio.sleep(0.05)
        [(_, entry)] = w.admin.xrange(ka.dead_letter)
        assert entry["tenant"] == w.names["a"] and entry["job_id"] == "junk"
        assert not w.admin.exists(kb.dead_letter) and not w.admin.exists(Keys(w.prefix).dead_letter)
    finally:
        await a.aclose()


async def test_a_tenants_max_queued_caps_its_streams_together(acl_world):
    w = acl_world
    async with consuming(w, TenantEcho(w.tenants)):
        pass  # announces max_queued for tenant c only
    limits = w.admin.hgetall(f"{w.prefix}:limits")
    assert limits[f"max_queued:{w.names['c']}"] == "2" and f"max_queued:{w.names['a']}" not in limits
    request = ScoreRequest(items=_items("r"))
    async with (
        QueueReferee(REDIS_URL, job_id="j1", prefix=w.prefix, api_key=w.keys["c"]) as c1,
        QueueReferee(REDIS_URL, job_id="j2", prefix=w.prefix, api_key=w.keys["c"]) as c2,
        QueueReferee(REDIS_URL, job_id="j1", prefix=w.prefix, api_key=w.keys["a"]) as a1,
    ):
        await c1.send("score", request)
        await c2.send("score", request)  # another job of the same tenant: counted together
        with pytest.raises(BacklogFull, match="max_queued") as err:
            await c1.send("score", request)
        assert err.value.status == 429 and err.value.code == "backlog_full"
        for _ in range(3):  # another tenant is not held back
            await a1.send("score", request)


async def test_a_tenant_is_refused_a_job_past_max_jobs_and_lists_of_jobs_stay_bounded(acl_world):
    w = acl_world
    async with consuming(w, TenantEcho(w.tenants)):
        pass  # announces the limits
    # as a consumer with max_jobs_per_tenant 2 would (the send script reads the tenant's copy)
    w.admin.hset(Keys(w.prefix, w.names["a"]).tenant_limits, "max_jobs", 2)
    request = ScoreRequest(items=_items("r"))
    async with (
        QueueReferee(REDIS_URL, job_id="j1", prefix=w.prefix, api_key=w.keys["a"]) as j1,
        QueueReferee(REDIS_URL, job_id="j2", prefix=w.prefix, api_key=w.keys["a"]) as j2,
        QueueReferee(REDIS_URL, job_id="j3", prefix=w.prefix, api_key=w.keys["a"]) as j3,
        QueueReferee(REDIS_URL, job_id="j1", prefix=w.prefix, api_key=w.keys["b"]) as other,
    ):
        await j1.send("score", request)
        await j2.send("score", request)
        await j1.send("score", request)  # a job it already has: fine
        with pytest.raises(BacklogFull, match="max_jobs_per_tenant") as err:
            await j3.send("score", request)
        assert err.value.status == 429
        await other.send("score", request)  # another tenant's jobs are its own


# ---------------------------------------------------------------- part 1: scripts, on a Redis of its own


@pytest.fixture()
def scripts_world(tmp_path):
    """``acl_world`` on a throwaway redis-server: these tests empty its script cache (SCRIPT FLUSH),
    which on the shared Redis would stall the tenants of concurrent test runs."""
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    server = OwnRedis(tmp_path)
    server.start()
    admin = redis_sync.Redis(port=server.port, decode_responses=True)
    prefix = "rs"
    key_a = new_key("team-a")
    tenants = [TenantSettings(name="team-a", keys=[hash_key(key_a)])]
    password = uuid.uuid4().hex
    apply_acl(admin, acl_rules(tenants, prefix=prefix, server_password=password, disable_default=False))
    try:
        yield SimpleNamespace(
            redis=server,
            url=server.url,
            admin=admin,
            prefix=prefix,
            tenants=tenants,
            key=key_a,
            server_url=server.url.replace("redis://", f"redis://referee-server:{password}@", 1),
        )
    finally:
        admin.close()
        server.kill()


async def test_tenants_send_through_the_scripts_the_consumers_load(scripts_world, monkeypatch):
    """A tenant cannot load the send script: until a consumer has (no consumer ever ran, or Redis
    lost its scripts), its sends get NOSCRIPT, retried until the request's deadline."""
    w = scripts_world
    stream = Keys(w.prefix, "team-a").stream("j")
    request = ScoreRequest(items=_items("abc"))

    def tenant(timeout: float) -> QueueReferee:
        return QueueReferee(w.url, job_id="j", prefix=w.prefix, api_key=w.key, timeout=timeout)

    # No consumer has ever run on this Redis: QueueUnavailable at the deadline, saying why.
    async with tenant(1.5) as q:
        sends = Tries(monkeypatch, q._redis, "evalsha")
        with pytest.raises(QueueUnavailable, match="no judge consumer has loaded the queue's scripts"):
            await q.send("score", request)
        # retried (NOSCRIPT), and stopped when the next try would have been too late
        assert 2 <= sends.count <= MAX_TRIES_IN_1_5_S
    assert not w.admin.exists(stream) and w.admin.script_exists(SEND_SHA) == [False]

    service = TenantEcho(w.tenants)
    async with consuming(w, service) as consumer, tenant(30) as q:
        # The consumer, logged in as the server's user, loaded the scripts before it was consuming.
        assert w.admin.script_exists(*TENANT_SCRIPTS) == [True] * len(TENANT_SCRIPTS)
        assert (await q.score(items=_items("abc"))).results[0].score == 3
        # Redis loses its scripts under a running consumer (no reconnect): it loads them again.
        w.admin.script_flush()
        assert (await q.score(items=_items("abcd"))).results[0].score == 4
        assert consumer.state == "consuming" and consumer.reconnects == 0

    # No consumer running and the cache emptied: the send waits, and goes through as soon as the
    # scripts are loaded again (the server's user, a moment later).
    w.admin.script_flush()
    server = Redis.from_url(w.server_url, decode_responses=True)

    async def reload_after(refused: asyncio.Event) -> None:
        await refused.wait()  # the sender has tried, and been answered NOSCRIPT
        for source in TENANT_SCRIPTS.values():
            await server.script_load(source)

    try:
        async with tenant(30) as q:
            sends = Tries(monkeypatch, q._redis, "evalsha")
            reload = asyncio.create_task(reload_after(sends.answered))
            await q.send("score", request)
            assert sends.count >= 2  # it waited (tried again) until the scripts were there
            await reload
    finally:
        await server.aclose()
    assert w.admin.xlen(stream) == 1

    # The open tenant's user here has every right: it loads the script itself, at once.
    w.admin.script_flush()
    async with QueueReferee(w.url, job_id="j", prefix="open", timeout=30) as q:
        sends = Tries(monkeypatch, q._redis, "evalsha")
        await q.send("score", request)
        assert sends.count == 2  # NOSCRIPT, then sent again at once after loading it: no backoff
    assert w.admin.script_exists(SEND_SHA) == [True] and w.admin.xlen(Keys("open").stream("j")) == 1
    # An open sender whose user may not load scripts: its refused SCRIPT LOAD is not a 403, it
    # waits for a consumer like a tenant.
    w.admin.script_flush()
    w.admin.execute_command(
        "ACL", "SETUSER", "no-scripts", "on", ">pw", "~*", "+@all", "-@scripting", "+evalsha"
    )
    url = w.url.replace("redis://", "redis://no-scripts:pw@", 1)
    async with QueueReferee(url, job_id="j", prefix="open", timeout=1.5) as q:
        with pytest.raises(QueueUnavailable, match="no judge consumer has loaded"):
            await q.send("score", request)
        assert q._may_load is False


async def test_a_server_user_without_script_exists_still_keeps_the_scripts_loaded(scripts_world):
    """An ACL file from before SCRIPT EXISTS was granted: the consumer loads the scripts on every
    check instead of failing (and reconnecting) forever."""
    w = scripts_world
    w.admin.execute_command("ACL", "SETUSER", "referee-server", "-script|exists")
    async with (
        consuming(w, TenantEcho(w.tenants)) as consumer,
        QueueReferee(w.url, job_id="j", prefix=w.prefix, api_key=w.key, timeout=30) as q,
    ):
        w.admin.script_flush()
        assert (await q.score(items=_items("ab"))).results[0].score == 2
        assert not consumer._may_check_scripts and consumer.state == "consuming"
        assert consumer.reconnects == 0


async def test_a_server_user_from_an_older_acl_file_still_consumes_without_sweeping(scripts_world):
    """A server user without the commands of the sweep (SCAN, TYPE, PTTL, STRLEN): the consumer
    says so once and goes on consuming, rather than failing (and reconnecting) forever."""
    w = scripts_world
    w.admin.execute_command("ACL", "SETUSER", "referee-server", "-scan", "-type", "-pttl", "-strlen")
    async with (
        consuming(w, TenantEcho(w.tenants)) as consumer,
        QueueReferee(w.url, job_id="j", prefix=w.prefix, api_key=w.key, timeout=30) as q,
    ):
        await _until(lambda: not consumer._may_sweep, "the sweep to be refused")
        assert (await q.score(items=_items("ab"))).results[0].score == 2
        assert consumer.state == "consuming" and consumer.reconnects == 0 and consumer.sweeps == 0


# ---------------------------------------------------------------- part 1: one tenant against the others
# Each test causes the attack for real, as the attacking tenant's own Redis user, against a running
# consumer, and asserts what the other tenants see: their messages answered, the consumer consuming
# (what /readyz reports), nothing of theirs lost, and the attacker answered and dead-lettered.

LIMIT = 64 << 10  # queue.max_message_bytes in these tests


def _message(job: str, request_id: str, response: str = "r") -> str:
    """A queued /score message, as QueueReferee writes it."""
    body = ScoreRequest(items=_items(response)).model_dump(mode="json", exclude_none=True)
    msg = QueueMessage(type="score", job_id=job, request_id=request_id, sent_at=time.time(), body=body)
    return msg.model_dump_json()


def _reply_bytes(reply) -> int:
    if isinstance(reply, (bytes, str)):
        return len(reply)
    if isinstance(reply, dict):
        return sum(_reply_bytes(k) + _reply_bytes(v) for k, v in reply.items())
    if isinstance(reply, (list, tuple)):
        return sum(_reply_bytes(v) for v in reply)
    return 8


class Fetched:
    """What a Redis client got back, command by command: the largest reply (strings' lengths
    summed), i.e. the most a consumer ever loaded from Redis at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, client) -> None:
        self.largest = 0
        self.commands = 0
        inner = client.execute_command

        async def measured(*args, **options):
            reply = await inner(*args, **options)
            self.commands += 1
            self.largest = max(self.largest, _reply_bytes(reply))
            return reply

        monkeypatch.setattr(client, "execute_command", measured)


async def _until(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_an_oversized_message_is_dead_lettered_unread_and_the_others_are_answered(
    acl_world, monkeypatch
):
    """Tenant A writes two messages of 1 MiB, 16 times queue.max_message_bytes, straight into its
    job streams (its ACL lets it XADD there): one waiting to be read, one that a consumer which died
    had taken (reclaimed). The consumer never loads either; each is dead-lettered at its first
    delivery, with its reason, and its sender answered 413; B's messages and A's own messages within
    the limit are answered, and the consumer keeps consuming."""
    w = acl_world
    ka, kb = Keys(w.prefix, w.names["a"]), Keys(w.prefix, w.names["b"])
    a = _tenant_client(w, "a")
    big = "x" * (1 << 20)
    fresh, reclaimed = uuid.uuid4().hex, uuid.uuid4().hex
    a.xadd(ka.stream("big"), {"msg": _message("big", fresh, big)})
    a.zadd(ka.jobs, {"big": time.time(), "died": time.time()})
    # Taken by a consumer that died: pending, idle long enough to be reclaimed at once.
    w.admin.xgroup_create(ka.stream("died"), "judges", id="0", mkstream=True)
    a.xadd(ka.stream("died"), {"msg": _message("died", reclaimed, big)})
    [(_, [(entry, _)])] = w.admin.xreadgroup("judges", "gone", {ka.stream("died"): ">"}, count=1)
    w.admin.xclaim(ka.stream("died"), "judges", "gone", 0, [entry], idle=10**9, justid=True)
    a.close()
    service = TenantEcho(w.tenants)
    fetched: list[Fetched] = []
    async with (
        consuming(
            w,
            service,
            prepare=lambda c: fetched.append(Fetched(monkeypatch, c.redis)),
            max_message_bytes=LIMIT,
        ) as consumer,
        QueueReferee(REDIS_URL, job_id="ok", prefix=w.prefix, api_key=w.keys["a"]) as qa,
        QueueReferee(REDIS_URL, job_id="big", prefix=w.prefix, api_key=w.keys["a"]) as qa_big,
        QueueReferee(REDIS_URL, job_id="died", prefix=w.prefix, api_key=w.keys["a"]) as qa_died,
        QueueReferee(REDIS_URL, job_id="run", prefix=w.prefix, api_key=w.keys["b"]) as qb,
    ):
        got = await asyncio.gather(
            *(qb.score(items=_items("b" * n)) for n in (1, 2, 3)), qa.score(items=_items("aaaa"))
        )
        assert [g.results[0].score for g in got] == [1, 2, 3, 4]
        # Dead-lettered at the first delivery that reached this consumer (the reclaimed one's second),
        # not after max_deliveries.
        for q, rid, delivery in ((qa_big, fresh, 1), (qa_died, reclaimed, 2)):
            with pytest.raises(BadRequest, match="max_message_bytes") as err:
                await q.receive("score", rid, timeout=20)
            assert err.value.status == 413 and err.value.code == "too_large"
            assert q.last_reply.attempts == delivery
        assert consumer.state == "consuming" and consumer.reconnects == 0
    assert fetched[0].commands > 0 and fetched[0].largest < LIMIT  # neither payload was ever loaded
    dead = [e for _, e in w.admin.xrange(ka.dead_letter)]
    assert sorted(e["request_id"] for e in dead) == sorted([fresh, reclaimed])
    assert all("max_message_bytes" in e["error"] and len(e["msg"]) < LIMIT for e in dead)
    assert not w.admin.exists(kb.dead_letter)
    assert w.admin.xlen(ka.stream("big")) == 0 and w.admin.xlen(ka.stream("died")) == 0  # acknowledged
    assert w.admin.xlen(kb.stream("run")) == 0  # nothing of B's left behind
    assert sorted(service.asked) == sorted(
        [(w.names["b"], "run", True)] * 3 + [(w.names["a"], "ok", True)]
    )  # the oversized ones were not judged


async def test_a_message_that_is_not_utf8_is_dead_lettered_and_the_rest_of_its_batch_answered(acl_world):
    """A message whose bytes are not UTF-8, written by tenant A between two good ones of its own,
    read in one batch with B's messages: it is dead-lettered and its sender answered 400; every
    other message of the batch is answered at its first delivery, none reclaimed, and the
    consumer never reconnects."""
    from reward_server import metrics

    w = acl_world
    ka, kb = Keys(w.prefix, w.names["a"]), Keys(w.prefix, w.names["b"])
    a = _tenant_client(w, "a")
    bad, good = uuid.uuid4().hex, [uuid.uuid4().hex, uuid.uuid4().hex]
    a.xadd(ka.stream("mixed"), {"msg": _message("mixed", good[0])})
    a.xadd(ka.stream("mixed"), {"msg": _message("mixed", bad, "BAD").encode().replace(b"BAD", b"\xff\xfe")})
    a.xadd(ka.stream("mixed"), {"msg": _message("mixed", good[1], "rr")})
    a.zadd(ka.jobs, {"mixed": time.time()})
    a.close()
    service = TenantEcho(w.tenants)
    async with (
        QueueReferee(REDIS_URL, job_id="mixed", prefix=w.prefix, api_key=w.keys["a"]) as qa,
        QueueReferee(REDIS_URL, job_id="run", prefix=w.prefix, api_key=w.keys["b"]) as qb,
    ):
        sent = [await qb.send("score", ScoreRequest(items=_items("b" * n))) for n in (1, 2)]
        reclaimed = metrics.QUEUE_RECLAIMED._value.get()
        async with consuming(w, service, read_count=4) as consumer:  # one read takes them all
            for rid, score in zip(sent, (1, 2), strict=True):
                assert (await qb.receive("score", rid, timeout=20)).results[0].score == score
                assert qb.last_reply.attempts == 1
            for rid, score in zip(good, (1, 2), strict=True):
                assert (await qa.receive("score", rid, timeout=20)).results[0].score == score
                assert qa.last_reply.attempts == 1
            with pytest.raises(BadRequest, match="UTF-8") as err:
                await qa.receive("score", bad, timeout=20)
            assert err.value.status == 400
            assert consumer.state == "consuming" and consumer.reconnects == 0
        assert metrics.QUEUE_RECLAIMED._value.get() == reclaimed
    [(_, entry)] = w.admin.xrange(ka.dead_letter)
    assert entry["request_id"] == bad and "UTF-8" in entry["error"]
    assert not w.admin.exists(kb.dead_letter) and w.admin.xlen(ka.stream("mixed")) == 0
    assert len(service.asked) == 4


async def test_keys_of_the_wrong_type_in_a_namespace_do_not_stop_the_consumer(acl_world):
    """A job's stream name holding a string and a jobs set that is not a sorted set: the tenants'
    users may no longer write either, but users from an older ACL file could (made here by the
    admin). The consumer skips them, removes them, and serves everyone else."""
    w = acl_world
    ka, kb, kc = (Keys(w.prefix, w.names[k]) for k in ("a", "b", "c"))
    a, c = _tenant_client(w, "a"), _tenant_client(w, "c")
    try:
        for write in (
            lambda: a.set(ka.stream("evil"), "not a stream"),
            lambda: c.set(kc.jobs, "not a sorted set"),
            lambda: c.xadd(kc.jobs, {"not": "a sorted set"}),
        ):
            with pytest.raises(NoPermissionError):
                write()
    finally:
        a.close()
        c.close()
    w.admin.set(ka.stream("evil"), "not a stream")
    w.admin.zadd(ka.jobs, {"evil": time.time()})
    w.admin.set(kc.jobs, "not a sorted set")
    service = TenantEcho(w.tenants)
    async with (
        consuming(w, service) as consumer,
        QueueReferee(REDIS_URL, job_id="ok", prefix=w.prefix, api_key=w.keys["a"]) as qa,
        QueueReferee(REDIS_URL, job_id="run", prefix=w.prefix, api_key=w.keys["b"]) as qb,
    ):
        assert (await qb.score(items=_items("bb"))).results[0].score == 2
        assert (await qa.score(items=_items("aaa"))).results[0].score == 3
        await _until(
            lambda: w.admin.type(ka.stream("evil")) != "string" and not w.admin.exists(kc.jobs),
            "the bad keys to go",
        )  # (job "evil" is listed: its stream is made again, as a stream, to be read)
        assert (await qb.score(items=_items("bbb"))).results[0].score == 3
        assert consumer.state == "consuming" and consumer.reconnects == 0
    assert not w.admin.exists(kb.dead_letter)


async def test_a_sender_is_refused_a_message_over_the_published_limit_before_sending(acl_world, monkeypatch):
    w = acl_world
    async with consuming(w, TenantEcho(w.tenants), max_message_bytes=LIMIT):
        pass  # published the limits
    assert w.admin.hget(f"{w.prefix}:limits", "max_message_bytes") == str(LIMIT)
    ka = Keys(w.prefix, w.names["a"])
    async with QueueReferee(REDIS_URL, job_id="j", prefix=w.prefix, api_key=w.keys["a"]) as q:
        sends = Tries(monkeypatch, q._redis, "evalsha")
        with pytest.raises(BadRequest, match="max_message_bytes") as err:
            await q.score(items=_items("x" * LIMIT))
        assert err.value.status == 413 and err.value.code == "too_large"
        assert sends.count == 0  # refused before sending
        assert (await q.send("score", ScoreRequest(items=_items("x" * (LIMIT // 2))))) is not None
        assert sends.count == 1
    # A sender that skips the check: the send script refuses it, and nothing is queued.
    a = _tenant_client(w, "a")
    try:
        raw = _message("k", uuid.uuid4().hex, "x" * LIMIT)
        added = a.evalsha(
            SEND_SHA, 2, ka.stream("k"), ka.jobs, raw, 5, "k", time.time(), w.names["a"], 0,
            ka.streams_prefix, ka.tenant_limits, KEY_LAYOUT,
        )  # fmt: skip
        assert added == [6, len(raw.encode()), LIMIT] and not a.exists(ka.stream("k"))
    finally:
        a.close()
    # A limit raised since: the client reads it again rather than refusing on its old value.
    for limits in (f"{w.prefix}:limits", ka.tenant_limits):  # as a consumer publishes it: both
        w.admin.hset(limits, "max_message_bytes", 4 * LIMIT)
    async with QueueReferee(REDIS_URL, job_id="j", prefix=w.prefix, api_key=w.keys["a"]) as q:
        await q.send("score", ScoreRequest(items=_items("x" * (LIMIT // 2))))
        await q.send("score", ScoreRequest(items=_items("x" * (2 * LIMIT))))
        assert w.admin.xlen(ka.stream("j")) == 3


def test_the_servers_message_limit_is_the_send_scripts_own_default():
    """The send script's limit when no consumer has published one is the server's default."""
    assert QueueSettings().max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES


@pytest.fixture()
def full_world(tmp_path):
    """Two tenants on a throwaway redis-server whose memory a test may fill."""
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    server = OwnRedis(tmp_path)
    server.start()
    admin = redis_sync.Redis(port=server.port, decode_responses=True)
    keys = {n: new_key(n) for n in ("team-a", "team-b")}
    tenants = [TenantSettings(name=n, keys=[hash_key(k)]) for n, k in keys.items()]
    password = uuid.uuid4().hex
    apply_acl(admin, acl_rules(tenants, prefix="rf", server_password=password, disable_default=False))
    try:
        yield SimpleNamespace(
            redis=server,
            url=server.url,
            admin=admin,
            prefix="rf",
            tenants=tenants,
            keys=keys,
            server_url=server.url.replace("redis://", f"redis://referee-server:{password}@", 1),
        )
    finally:
        admin.close()
        server.kill()


async def test_a_tenant_cannot_fill_redis_with_keys_that_never_expire(full_world):
    """Tenant A's user is refused every write that would leave a key without a TTL or outside the
    key families the senders' scripts write. The writes those scripts need (an upload's bytes, a
    job's stream) it may still make by hand: it fills Redis with uploads that never expire, over its
    upload budget and over the size cap, and a stream no job lists. Redis is full (noeviction): B's
    next request waits, and is answered once the consumer has bounded A's keys."""
    w = full_world
    ka = Keys(w.prefix, "team-a")
    media = MediaSettings(max_image_bytes=256 << 10, tenant_blob_bytes=1 << 20, blob_ttl_s=600)
    a = redis_sync.Redis(port=w.redis.port, username="team-a", password=w.keys["team-a"])
    for write in (
        lambda: a.set(f"{ka.namespace}junk", "x"),
        lambda: a.incrby(f"{ka.namespace}counter", 1),
        lambda: a.zadd(f"{ka.namespace}other", {"x": 1}),
        lambda: a.xadd(ka.dead_letter, {"msg": "x"}),
        lambda: a.set(ka.result("j", "r"), "1"),
        lambda: a.set(ka.reply("j", "r"), "x"),
        lambda: a.set(ka.stream("j"), "x"),
        lambda: a.xadd(ka.jobs, {"x": "y"}),
    ):
        with pytest.raises(NoPermissionError):
            write()
    service = TenantEcho(w.tenants, media)
    async with (
        consuming(w, service) as consumer,
        QueueReferee(w.url, job_id="run", prefix=w.prefix, api_key=w.keys["team-b"], timeout=60) as qb,
        QueueReferee(w.url, job_id="up", prefix=w.prefix, api_key=w.keys["team-a"], timeout=60) as qa,
    ):
        assert (await qb.score(items=_items("b"))).results[0].score == 1
        # What the upload script writes, A may write through it (twice: the second renews the TTL).
        uploaded = b"an image's bytes" * 1000
        assert (await qa.upload(uploaded)) == (await qa.upload(uploaded))
        legit = ka.blob(hashlib.sha256(uploaded).hexdigest())
        assert w.admin.strlen(legit) == len(uploaded) and int(w.admin.get(ka.blob_bytes)) == len(uploaded)
        w.admin.config_set("maxmemory-policy", "noeviction")
        w.admin.config_set("maxmemory", w.admin.info("memory")["used_memory"] + (4 << 20))
        a.set(ka.blob("f" * 64), b"x" * (media.max_image_bytes + 1))  # over the size cap
        a.xadd(ka.stream("hidden"), {"msg": "x" * 1000})  # no job lists it: never read
        a.incrby(ka.blob_bytes, 1)  # the upload counter, without its TTL
        with pytest.raises(redis_sync.exceptions.OutOfMemoryError):
            for n in range(1000):  # uploads without a TTL, until Redis refuses more
                a.set(ka.blob(f"{n:064x}"), b"x" * (200 << 10))
        a.close()
        # As full as a flood that goes on keeps it: not even a small message fits.
        w.admin.config_set("maxmemory", w.admin.info("memory")["used_memory"] - (64 << 10))
        assert (await qb.score(items=_items("bb"))).results[0].score == 2
        swept = consumer.sweeps
        await _until(lambda: consumer.sweeps >= swept + 2, "two whole sweeps after the flood")
        assert (await qb.score(items=_items("bbb"))).results[0].score == 3
        assert consumer.state == "consuming"
    blobs = list(w.admin.scan_iter(f"{ka.namespace}blob:*"))
    sizes = [w.admin.strlen(k) for k in blobs]
    assert sum(sizes) <= media.tenant_blob_bytes and max(sizes) <= media.max_image_bytes
    assert all(0 < w.admin.pttl(k) <= media.blob_ttl_s * 1000 for k in [*blobs, ka.blob_bytes])
    assert not w.admin.exists(ka.stream("hidden"))
    assert legit in blobs  # what A uploaded through the script is kept: the hand-made ones went first


# ---------------------------------------------------------------- part 2: a real server with keys


async def test_tenants_get_their_own_answers_from_a_real_server(tenant_server):
    ts = tenant_server
    limits = redis_sync.Redis.from_url(ts.redis_url, decode_responses=True).hgetall(f"{ts.prefix}:limits")
    assert limits["auth"] == "1" and limits["max_queued:team-c"] == "3"
    assert "max_queued:team-a" not in limits
    rid = uuid.uuid4().hex
    b_items, a_items = _items("Paris."), _items("The capital of France is Paris.", "London.")
    async with (
        QueueReferee(
            ts.redis_url, job_id="run", prefix=ts.prefix, api_key=ts.keys["team-a"], timeout=120
        ) as qa,
        QueueReferee(
            ts.redis_url, job_id="run", prefix=ts.prefix, api_key=ts.keys["team-b"], timeout=120
        ) as qb,
    ):
        # B's request id, reused by A on a job of the same name: each gets the answer to its own.
        await qb.send("score", ScoreRequest(judge="tiny-rm", items=b_items), request_id=rid)
        await qa.send("score", ScoreRequest(judge="tiny-rm", items=a_items), request_id=rid)
        got_b, got_a = await asyncio.gather(qb.receive("score", rid), qa.receive("score", rid))
    async with httpx.AsyncClient(base_url=ts.url, timeout=120) as http:
        for tenant, items, got in (("team-a", a_items, got_a), ("team-b", b_items, got_b)):
            body = {"judge": "tiny-rm", "items": [i.model_dump() for i in items]}
            direct = (await http.post("/score", json=body, headers=ts.headers(tenant))).json()
            assert [r.score for r in got.results] == pytest.approx(
                [r["score"] for r in direct["results"]], abs=1e-4
            )


async def test_a_real_server_refuses_forged_jobs_keyless_senders_and_floods(tenant_server):
    ts = tenant_server
    admin = Redis.from_url(ts.redis_url, decode_responses=True)
    ka, kc = Keys(ts.prefix, "team-a"), Keys(ts.prefix, "team-c")
    a = Redis.from_url(ts.redis_url, username="team-a", password=ts.keys["team-a"], decode_responses=True)
    c = Redis.from_url(ts.redis_url, username="team-c", password=ts.keys["team-c"], decode_responses=True)
    try:
        # No key: refused at once (the consumers published auth=1), nothing queued.
        async with QueueReferee(ts.redis_url, job_id="keyless", prefix=ts.prefix, timeout=60) as q:
            with pytest.raises(AuthenticationError, match="api_key"):
                await q.score(judge="tiny-rm", items=_items("r"))
        # A message on job "mine"'s stream that names another job: 403 wrong_job, not judged.
        rid = uuid.uuid4().hex
        forged = QueueMessage(
            type="score",
            job_id="theirs",
            request_id=rid,
            sent_at=time.time(),
            body=ScoreRequest(judge="tiny-rm", items=_items("x")).model_dump(),
        )
        await a.xadd(ka.stream("mine"), {"msg": forged.model_dump_json()})
        await a.zadd(ka.jobs, {"mine": time.time()})
        async with QueueReferee(
            ts.redis_url, job_id="mine", prefix=ts.prefix, api_key=ts.keys["team-a"]
        ) as q:
            with pytest.raises(PermissionDenied) as err:
                await q.receive("score", rid, timeout=30)
            assert err.value.code == "wrong_job"
        # team-c's max_queued (3), counted over all its job streams: three messages parked on a job
        # silent for longer than jobs_ttl_s (no consumer polls it; the cap still counts it).
        for _ in range(3):
            await c.xadd(kc.stream("parked"), {"msg": "{}"})
        await c.zadd(kc.jobs, {"parked": 1.0})
        async with QueueReferee(ts.redis_url, job_id="j", prefix=ts.prefix, api_key=ts.keys["team-c"]) as q:
            with pytest.raises(BacklogFull, match="max_queued"):
                await q.send("score", ScoreRequest(judge="tiny-rm", items=_items("r")))
    finally:
        await admin.delete(kc.stream("parked"))
        await admin.zrem(kc.jobs, "parked")
        for r in (admin, a, c):
            await r.aclose()
