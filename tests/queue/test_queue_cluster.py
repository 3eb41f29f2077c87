"""The queue on a real Redis Cluster: three primaries (each with a replica) started by the test on
loopback ports with the Debian ``redis-server`` and ``redis-cli --cluster create``, in a temporary
directory, torn down afterwards.

What runs there: the round trip through ``redis+cluster://`` URLs (consumer, SDK, ACL users applied
on every node), several tenants whose keys live on different primaries, a killed consumer's messages
reclaimed and answered once, ACL isolation, a script across two tenants' slots refused by the
cluster, and a failover (a replica promoted with ``CLUSTER FAILOVER`` during traffic) after which
every request is answered once. The judge is a stand-in service (as in test_queue_faults.py): these
are tests of the queue, not of judging. Which primary owns which slot is read from the cluster, never
assumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import socket
import subprocess
import time
import uuid
from types import SimpleNamespace

import pytest
import redis as redis_sync
from redis.crc import key_slot

from referee import ScoreItem, ScoreRequest, connect
from referee.acl import acl_rules, apply_acl, remove_users
from referee.auth import hash_key, new_key
from referee.keys import Keys
from referee.queue import QueueReferee
from referee.scripts import SEND_SHA
from reward_server.consumer import QueueConsumer
from reward_server.settings import QueueSettings, TenantSettings
from tests.queue.test_queue_tenants import TenantEcho

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
    reason="needs redis-server and redis-cli",
)

FAST = {"block_ms": 20, "reclaim_every_s": 0.2, "reconnect_max_s": 0.5}
CROSSSLOT = re.compile(r"CROSSSLOT|same slot|same key slot|different slots", re.I)


# ---------------------------------------------------------------- a cluster of the test's own


def _free_ports(n: int) -> list[int]:
    """``n`` loopback ports, each with its cluster bus port (+10000) free too."""
    found: list[int] = []
    while len(found) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535 or port in found:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        found.append(port)
    return found


class OwnCluster:
    """``primaries`` primaries with ``replicas`` replicas each, on loopback."""

    def __init__(self, root, primaries: int = 3, replicas: int = 1) -> None:
        self.root, self.replicas = root, replicas
        self.ports = _free_ports(primaries * (1 + replicas))
        self.procs: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def node(self, port: int) -> redis_sync.Redis:
        return redis_sync.Redis(port=port, decode_responses=True, socket_timeout=10)

    def start(self) -> None:
        for port in self.ports:
            where = self.root / str(port)
            where.mkdir(parents=True)
            self.procs.append(
                subprocess.Popen(
                    [
                        *("redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""),
                        *("--appendonly", "no", "--dir", str(where), "--cluster-enabled", "yes"),
                        *("--cluster-config-file", str(where / "nodes.conf")),
                        *("--cluster-node-timeout", "2000", "--protected-mode", "no"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for port in self.ports:
            self._wait(lambda p=port: self.node(p).ping(), f"node {port} to answer")
        subprocess.run(
            [
                *("redis-cli", "--cluster", "create"),
                *(f"127.0.0.1:{p}" for p in self.ports),
                *("--cluster-replicas", str(self.replicas), "--cluster-yes"),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=60,
        )
        self.wait_ok()

    def wait_ok(self) -> None:
        """Until every node says cluster_state:ok and knows every node and a primary per shard."""

        def ok() -> bool:
            for port in self.ports:
                info = self.node(port).execute_command("CLUSTER", "INFO")
                if "cluster_state:ok" not in info:
                    return False
                nodes = self.node(port).execute_command("CLUSTER", "NODES")
                if isinstance(nodes, dict):
                    nodes = "\n".join(f"{k} {v}" for k, v in nodes.items())
                known = [line for line in str(nodes).splitlines() if line.strip()]
                if len(known) < len(self.ports) or any(
                    "fail" in line or "handshake" in line for line in known
                ):
                    return False
            return True

        self._wait(ok, "the cluster to be ok on every node", 60)

    def owner(self, key: str) -> tuple[int, list[int]]:
        """The port of the primary that owns ``key``'s slot now, and its replicas' ports (read from
        ``CLUSTER SHARDS``: never assumed)."""
        slot = key_slot(key.encode())
        for shard in self.node(self.ports[0]).execute_command("CLUSTER", "SHARDS"):
            shard = _pairs(shard)
            ranges = shard["slots"]
            if not any(int(ranges[k]) <= slot <= int(ranges[k + 1]) for k in range(0, len(ranges), 2)):
                continue
            nodes = [_pairs(n) for n in shard["nodes"]]
            primary = [int(n["port"]) for n in nodes if n["role"] == "master" and n["health"] == "online"]
            replicas = [int(n["port"]) for n in nodes if n["role"] == "replica" and n["health"] == "online"]
            return primary[0], replicas
        raise AssertionError(f"no shard owns slot {slot}")

    def primary_ports(self) -> set[int]:
        ports = set()
        for shard in self.node(self.ports[0]).execute_command("CLUSTER", "SHARDS"):
            for n in _pairs(shard)["nodes"]:
                n = _pairs(n)
                if n["role"] == "master" and n["health"] == "online" and _pairs(shard)["slots"]:
                    ports.add(int(n["port"]))
        return ports

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait()

    @staticmethod
    def _wait(predicate, what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if predicate():
                    return
            except redis_sync.RedisError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.1)


def _pairs(value):
    """A RESP2 flat list of name, value... as a dict (RESP3 and some redis-py versions give dicts)."""
    if isinstance(value, dict):
        return {k.decode() if isinstance(k, bytes) else k: v for k, v in value.items()}
    return {value[k]: value[k + 1] for k in range(0, len(value), 2)}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    own = OwnCluster(tmp_path_factory.mktemp("cluster"))
    try:
        own.start()
        yield own
    finally:
        own.stop()


def _tenant_names(cluster: OwnCluster, n: int, tag: str) -> list[str]:
    """``n`` tenant names whose slots are on different primaries (as many as there are), by the
    cluster's own slot map."""
    names, used = [], set()
    for k in range(10_000):
        name = f"tc{k}-{tag}"
        primary, _ = cluster.owner(Keys("p", name).jobs)
        if primary not in used or len(used) == len(cluster.primary_ports()):
            names.append(name)
            used.add(primary)
        if len(names) == n:
            return names
    raise AssertionError("no tenant names spread over the primaries")


@pytest.fixture()
def world(cluster):
    """Three tenants (on three different primaries) with ACL users on every node of the cluster, a
    server user, on a prefix of the test's own; removed afterwards."""
    tag = uuid.uuid4().hex[:6]
    prefix = f"referee-test-cluster-{tag}"
    names = _tenant_names(cluster, 3, tag)
    keys = {name: new_key(name) for name in names}
    tenants = [TenantSettings(name=name, keys=[hash_key(keys[name])]) for name in names]
    server_user, server_password = f"referee-server-{tag}", uuid.uuid4().hex
    admin = connect(cluster.url, sync=True, decode_responses=True)
    rules = acl_rules(
        tenants,
        prefix=prefix,
        server_password=server_password,
        server_user=server_user,
        disable_default=False,
    )
    users = apply_acl(admin, rules)
    for port in cluster.ports:  # on every node, replicas included
        assert set(users) <= set(cluster.node(port).acl_users())
        cluster.node(port).execute_command("ACL", "LOG", "RESET")
    host = cluster.url.removeprefix("redis+cluster://")
    try:
        yield SimpleNamespace(
            cluster=cluster,
            prefix=prefix,
            names=names,
            keys=keys,
            tenants=tenants,
            admin=admin,
            users=users,
            server_url=f"redis+cluster://{server_user}:{server_password}@{host}",
        )
    finally:
        remove_users(admin, users)
        stale = list(admin.scan_iter(match=f"{prefix}:*", count=1000))
        for name in stale:
            admin.delete(name)
        admin.close()


def _denials(world) -> list[dict]:
    """ACL LOG entries of the world's users, on every node."""
    out = []
    for port in world.cluster.ports:
        out += [
            e
            for e in world.cluster.node(port).execute_command("ACL", "LOG", "128")
            if e["username"] in world.users
        ]
    return out


@contextlib.asynccontextmanager
async def consuming(world, service, name: str = "c1", **settings):
    settings = QueueSettings(
        url=world.server_url, prefix=world.prefix, consumer_name=name, **{**FAST, **settings}
    )
    consumer = QueueConsumer(service, settings)
    assert consumer.cluster
    task = asyncio.create_task(consumer.run())
    try:
        deadline = time.monotonic() + 15
        while consumer.state != "consuming":
            assert time.monotonic() < deadline, consumer.status()
            await asyncio.sleep(0.02)
        yield consumer
    finally:
        if consumer.state != "stopped":
            await consumer.stop(drain_s=1)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _referee(world, name: str, job: str, **kw) -> QueueReferee:
    return QueueReferee(world.cluster.url, job_id=job, prefix=world.prefix, api_key=world.keys[name], **kw)


def _items(*responses: str) -> list[ScoreItem]:
    return [ScoreItem(prompt="q", response=r) for r in responses]


# ---------------------------------------------------------------- the tests


async def test_round_trip_of_several_tenants_and_jobs_across_primaries(world):
    """Three tenants on three primaries, two jobs each, through one consumer: every request gets its
    own answer, from the tenant and job it was sent on; the consumer publishes the key layout and
    each tenant's copy of the limits in the tenant's slot; nobody is refused anything (ACL LOG)."""
    w = world
    service = TenantEcho(w.tenants)
    assert len({w.cluster.owner(Keys(w.prefix, n).jobs)[0] for n in w.names}) == 3
    async with consuming(w, service) as consumer:
        assert consumer.tenants == w.names
        assert w.admin.hget(f"{w.prefix}:limits", "key_layout") == "2"
        for name in w.names:
            assert w.admin.hget(Keys(w.prefix, name).tenant_limits, "auth") == "1"
        clients = [_referee(w, name, job, lost_check_s=0.5) for name in w.names for job in ("run-1", "run-2")]
        try:
            asked = [(q, "x" * (1 + k % 5) + "y" * m) for k, q in enumerate(clients) for m in range(3)]
            answers = await asyncio.gather(*(q.score(items=_items(text)) for q, text in asked))
            assert [a.results[0].score for a in answers] == [len(text) for _, text in asked]
            assert await clients[0].health() and (await clients[1].judges()).default == "echo"
            assert sum(q.resent for q in clients) == 0
        finally:
            for q in clients:
                await q.aclose()
        await asyncio.sleep(0.5)  # reclaim, heartbeat, backlog and cleanup (the sweep) ran as the server
        assert consumer.state == "consuming", consumer.status()
        assert consumer.sweeps >= 1
    assert sorted((t, j) for t, j, _ in service.asked) == sorted(
        (name, job) for name in w.names for job in ("run-1", "run-2") for _ in range(3)
    )
    assert _denials(w) == []
    for name in w.names:  # answered and acknowledged: the streams are empty, the tenant's keys in one slot
        keys = Keys(w.prefix, name)
        assert w.admin.xlen(keys.stream("run-1")) == 0
        slots = {key_slot(k.encode()) for k in w.admin.scan_iter(match=keys.pattern, count=1000)}
        assert slots == {key_slot(keys.jobs.encode())}


class Holding(TenantEcho):
    """Takes messages and never answers (until cancelled): a consumer about to be killed."""

    def __init__(self, tenants) -> None:
        super().__init__(tenants)
        self.held = 0

    async def score(self, request, **context):
        self.held += 1
        await asyncio.sleep(3600)


async def test_a_killed_consumers_messages_are_reclaimed_and_answered_once(world):
    """A consumer takes four messages of two tenants (on two primaries) and dies without a word: its
    messages stay pending; another consumer reclaims them after reclaim_idle_s and answers each once
    (second delivery)."""
    w = world
    doomed_service = Holding(w.tenants)
    settings = QueueSettings(url=w.server_url, prefix=w.prefix, consumer_name="doomed", **FAST)
    doomed = QueueConsumer(doomed_service, settings)
    task = asyncio.create_task(doomed.run())
    qa, qb = (
        _referee(w, w.names[0], "run", lost_check_s=0.5),
        _referee(w, w.names[1], "run", lost_check_s=0.5),
    )
    try:
        calls = [
            asyncio.create_task(q.score(items=_items(text)))
            for q, text in ((qa, "a"), (qa, "aa"), (qb, "bbb"), (qb, "bbbb"))
        ]
        deadline = time.monotonic() + 15
        while doomed_service.held < 4:
            assert time.monotonic() < deadline, doomed.status()
            await asyncio.sleep(0.02)
        # Killed: no hand-back, no answer, its connections gone.
        for t in [task, *doomed._tasks]:
            t.cancel()
        await asyncio.gather(task, *doomed._tasks, return_exceptions=True)
        await doomed.redis.aclose()
        service = TenantEcho(w.tenants)
        async with consuming(w, service, name="heir", reclaim_idle_s=0.5):
            answers = await asyncio.wait_for(asyncio.gather(*calls), 30)
        assert [a.results[0].score for a in answers] == [1, 2, 3, 4]
        assert sorted(t for t, _, _ in service.asked) == sorted([w.names[0]] * 2 + [w.names[1]] * 2)
        assert qa.last_reply.attempts == 2 and qa.last_reply.served_by == "heir"
        assert qa.resent == 0 and qb.resent == 0
    finally:
        await qa.aclose()
        await qb.aclose()


async def test_tenants_are_kept_apart_on_the_cluster(world):
    """A tenant's user reaches its own slot's keys and nothing of another's, on whichever node they
    are; the senders' scripts run as the tenant."""
    w = world
    a, b = w.names[0], w.names[1]
    ka, kb = Keys(w.prefix, a), Keys(w.prefix, b)
    service = TenantEcho(w.tenants)
    async with consuming(w, service), _referee(w, b, "secret") as qb:
        await qb.score(items=_items("private"))
        await qb.send("score", ScoreRequest(items=_items("pending")))
    as_a = connect(w.cluster.url, sync=True, username=a, password=w.keys[a], decode_responses=True)
    try:
        assert as_a.ping()
        assert as_a.hget(ka.tenant_limits, "auth") == "1"  # its own copy of the limits: read
        for refused in (
            lambda: as_a.xrange(kb.stream("secret")),
            lambda: as_a.zrevrange(kb.jobs, 0, -1),
            lambda: as_a.xadd(kb.stream("secret"), {"msg": "{}"}),
            lambda: as_a.hset(ka.tenant_limits, "max_backlog", 10**9),  # its copy: read-only
            lambda: as_a.hset(f"{w.prefix}:limits", "auth", 0),
            lambda: as_a.rpush(ka.reply("j", "r"), "forged"),
        ):
            with pytest.raises(redis_sync.exceptions.NoPermissionError):
                refused()
    finally:
        as_a.close()
    denied = _denials(w)
    assert denied and {e["username"] for e in denied} == {a}


def test_a_script_across_two_tenants_slots_is_refused_by_the_cluster(world):
    """Why each script keeps to one tenant: a script given two tenants' keys is refused, whichever
    refuses it (redis-py's cluster client before sending, or the node)."""
    w = world
    ka, kb = Keys(w.prefix, w.names[0]), Keys(w.prefix, w.names[1])
    assert key_slot(ka.jobs.encode()) != key_slot(kb.jobs.encode())
    args = ("EVALSHA", SEND_SHA, 2, ka.stream("j"), kb.jobs, "{}", 10, "j", time.time(), "x", 1, "", "")
    with pytest.raises(Exception) as by_client:
        w.admin.execute_command(*args)
    assert CROSSSLOT.search(str(by_client.value)), repr(by_client.value)
    # The raw command to one node, whichever it is: the node refuses it itself.
    for port in w.cluster.ports[:1]:
        with pytest.raises(redis_sync.ResponseError) as by_node:
            w.cluster.node(port).execute_command(*args)
        assert CROSSSLOT.search(str(by_node.value)), repr(by_node.value)


async def test_every_request_is_answered_once_through_a_failover(world):
    """A replica promoted (``CLUSTER FAILOVER``) while two tenants send: the senders and the consumer
    follow the slots to the new primary (MOVED, a fresh slot map), the consumer reloads the senders'
    scripts there (scripts are not replicated), and every request is answered exactly once."""
    w = world
    name = w.names[0]
    keys = Keys(w.prefix, name)
    primary, replicas = w.cluster.owner(keys.jobs)
    assert replicas, "the tenant's primary has no replica"
    service = TenantEcho(w.tenants)
    n = 40
    async with consuming(w, service), _referee(w, name, "run", lost_check_s=0.5, timeout=60) as q:
        other = _referee(w, w.names[1], "run", lost_check_s=0.5, timeout=60)
        try:
            first = await asyncio.gather(*(q.score(items=_items("a" * (k + 1))) for k in range(5)))
            assert [a.results[0].score for a in first] == list(range(1, 6))

            async def sender(client, texts):
                out = []
                for text in texts:
                    out.append((text, await client.score(items=_items(text))))
                    await asyncio.sleep(0.02)
                return out

            texts = ["b" * (k % 7 + 1) for k in range(n)]
            running = [
                asyncio.create_task(sender(q, texts[: n // 2])),
                asyncio.create_task(sender(q, texts[n // 2 :])),
                asyncio.create_task(sender(other, texts[:10])),
            ]
            while len(service.asked) < 15:
                await asyncio.sleep(0.02)
            w.cluster.node(replicas[0]).execute_command("CLUSTER", "FAILOVER")
            deadline = time.monotonic() + 30
            while w.cluster.owner(keys.jobs)[0] != replicas[0]:
                assert time.monotonic() < deadline, "the replica was not promoted"
                await asyncio.sleep(0.1)
            done = await asyncio.wait_for(asyncio.gather(*running), 60)
        finally:
            await other.aclose()
        for batch in done:
            assert all(answer.results[0].score == len(text) for text, answer in batch)
        assert sum(len(batch) for batch in done) == n + 10
        # after the failover: the new primary serves the tenant's slot, and new requests go through
        assert (await q.score(items=_items("after"))).results[0].score == 5
    assert w.cluster.owner(keys.jobs)[0] == replicas[0] and primary not in w.cluster.primary_ports()
    w.cluster.wait_ok()
