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
from referee.scripts import SEND_SHA, TENANT_SCRIPTS
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
                        # long: a node slow to answer on a busy machine is not failed over by itself
                        *("--cluster-node-timeout", "20000", "--protected-mode", "no"),
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
                state = info.get("cluster_state") if isinstance(info, dict) else None
                if state != "ok" and "cluster_state:ok" not in str(info):
                    return False
                nodes = self.node(port).execute_command("CLUSTER", "NODES")
                if isinstance(nodes, dict):
                    nodes = "\n".join(f"{k} {v}" for k, v in nodes.items())
                known = [line for line in str(nodes).splitlines() if line.strip()]
                if len(known) < len(self.ports) or any(
                    "fail" in line or "handshake" in line for line in known
                ):
                    return False
            for shard in self.node(self.ports[0]).execute_command("CLUSTER", "SHARDS"):
                nodes = [_pairs(n) for n in _pairs(shard)["nodes"]]
                if len([n for n in nodes if n["health"] == "online"]) < 1 + self.replicas:
                    return False  # a replica not yet in sync: not ready to be promoted
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
    for attempt in range(3):  # a port taken between choosing it and binding it: choose others
        own = OwnCluster(tmp_path_factory.mktemp("cluster"))
        try:
            own.start()
            break
        except (AssertionError, subprocess.SubprocessError):
            own.stop()
            if attempt == 2:
                raise
    try:
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
        assert consumer.state == "consuming" and consumer.reconnects == 0, consumer.status()
        assert consumer.sweeps >= 1 and consumer.backlog == 0
    assert sorted((t, j) for t, j, _ in service.asked) == sorted(
        (name, job) for name in w.names for job in ("run-1", "run-2") for _ in range(3)
    )
    assert _denials(w) == []
    for name in w.names:  # answered and acknowledged: the streams are empty, the tenant's keys in one slot
        keys = Keys(w.prefix, name)
        assert w.admin.xlen(keys.stream("run-1")) == 0
        slots = {key_slot(k.encode()) for k in w.admin.scan_iter(match=keys.pattern, count=1000)}
        assert slots == {key_slot(keys.jobs.encode())}


async def test_the_server_consumes_from_a_cluster_url(cluster, monkeypatch):
    """The server itself (its app, stand-in judges) on a ``redis+cluster://`` URL: it consumes,
    ``/readyz`` says so, a queued request of the open tenant is answered, and it stops cleanly."""
    import httpx

    from reward_server import app as app_module
    from reward_server.settings import ServerSettings
    from tests.queue.test_queue_faults import EchoService

    monkeypatch.delenv("REFEREE_CONFIG", raising=False)
    monkeypatch.setattr(app_module, "JudgeService", EchoService)
    prefix = f"referee-test-cluster-app-{uuid.uuid4().hex[:6]}"
    settings = ServerSettings(queue=QueueSettings(enabled=True, url=cluster.url, prefix=prefix, **FAST))
    app = app_module.create_app(settings)
    async with (
        app.app.router.lifespan_context(app.app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http,
    ):
        consumer = app.state.consumer
        deadline = time.monotonic() + 15
        while consumer.state != "consuming":
            assert time.monotonic() < deadline, consumer.status()
            await asyncio.sleep(0.05)
        assert consumer.cluster
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["queue"]["state"] == "consuming"
        async with QueueReferee(cluster.url, job_id="a", prefix=prefix, timeout=20) as q:
            assert (await q.score(items=_items("abc"))).results[0].score == 3
    admin = connect(cluster.url, sync=True)
    try:
        for name in list(admin.scan_iter(match=f"{prefix}:*", count=1000)):
            admin.delete(name)
    finally:
        admin.close()


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
    w.cluster.wait_ok()  # its replica in sync
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


# ---------------------------------------------------------------- a primary and its replica


class Endpoint:
    """A TCP endpoint in front of one Redis, as a managed Redis' name is: ``point_to`` moves it to
    another server and drops every connection through it, as a failover does."""

    def __init__(self, port: int) -> None:
        self.target, self.server, self.pipes = port, None, set()
        self.port = _free_ports(1)[0]

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader, writer) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        pair = (writer, up_writer)
        self.pipes.add(pair)

        async def pump(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self.pipes.discard(pair)

    def point_to(self, port: int) -> None:
        self.target = port
        for pair in list(self.pipes):
            for w in pair:
                w.close()

    async def stop(self) -> None:
        self.point_to(self.target)
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def _redis_server(port: int, where, *extra: str) -> subprocess.Popen:
    where.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            *("redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""),
            *("--appendonly", "no", "--dir", str(where), *extra),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


class Gated(TenantEcho):
    """Answers while ``gate`` is set; holds what it is asked while it is not."""

    def __init__(self) -> None:
        super().__init__([])
        self.gate = asyncio.Event()
        self.gate.set()

    async def score(self, request, **context):
        await self.gate.wait()
        return await super().score(request, **context)


async def test_a_promoted_replica_that_lost_acknowledged_writes_still_answers_every_request_once(tmp_path):
    """A primary and its replica behind one endpoint. The replica is promoted (``REPLICAOF NO ONE``)
    while the old primary still takes writes (the window of any failover): ten requests are sent and
    acknowledged there, then the old primary dies and the endpoint moves to the new one, which never
    saw them. Each sender notices its lost messages (neither in the stream nor answered) and sends
    them again with the same request ids; the consumer follows (redis-py's retry, or its own
    reconnect) and loads the senders' scripts there (scripts are not replicated); every call gets
    exactly one answer, its own, and nothing is left pending."""
    primary_port, replica_port = _free_ports(2)
    procs = [_redis_server(primary_port, tmp_path / "primary")]
    procs.append(
        _redis_server(replica_port, tmp_path / "replica", "--replicaof", "127.0.0.1", str(primary_port))
    )
    endpoint = Endpoint(primary_port)
    replica = redis_sync.Redis(port=replica_port, decode_responses=True)
    try:
        OwnCluster._wait(lambda: replica.info("replication").get("master_link_status") == "up", "replication")
        await endpoint.start()
        url, prefix = f"redis://127.0.0.1:{endpoint.port}/0", f"referee-test-failover-{uuid.uuid4().hex[:6]}"
        keys = Keys(prefix)
        service = Gated()
        settings = QueueSettings(url=url, prefix=prefix, consumer_name="c1", reclaim_idle_s=1.0, **FAST)
        consumer = QueueConsumer(service, settings)
        task = asyncio.create_task(consumer.run())
        senders = [
            QueueReferee(url, job_id=f"run-{k}", prefix=prefix, lost_check_s=0.3, timeout=60)
            for k in range(2)
        ]

        async def ask(q, texts):
            return [
                (t, a)
                for t, a in zip(
                    texts, await asyncio.gather(*(q.score(items=_items(t)) for t in texts)), strict=True
                )
            ]

        try:
            before = [await ask(q, ["a" * (k + 1) for k in range(5)]) for q in senders]  # replicated
            OwnCluster._wait(
                lambda: (
                    replica.info("replication").get("master_repl_offset")
                    == redis_sync.Redis(port=primary_port).info("replication").get("master_repl_offset")
                ),
                "the replica to catch up",
            )
            service.gate.clear()
            replica.execute_command("REPLICAOF", "NO", "ONE")  # promoted; the old primary takes writes on
            lost = [asyncio.create_task(ask(q, ["b" * (k + 1) for k in range(5)])) for q in senders]
            deadline = time.monotonic() + 15
            while sum(len(q._sent) for q in senders) < 10:  # all ten sent, acknowledged by the old primary
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            procs[0].kill()  # it dies with them
            procs[0].wait()
            endpoint.point_to(replica_port)
            while sum(q.resent for q in senders) < 10:  # each sender finds its five gone: sent again
                assert time.monotonic() < deadline + 15, [q.resent for q in senders]
                await asyncio.sleep(0.05)
            service.gate.set()
            during = await asyncio.wait_for(asyncio.gather(*lost), 60)
            after = [await ask(q, ["c" * (k + 1) for k in range(5)]) for q in senders]
            # Nothing left to answer on the new primary (lost answers' messages reclaimed, judged).
            streams = [keys.stream(f"run-{k}") for k in range(2)]
            deadline = time.monotonic() + 30
            while any(replica.xlen(s) or replica.xpending(s, "judges")["pending"] for s in streams):
                assert time.monotonic() < deadline, [replica.xlen(s) for s in streams]
                await asyncio.sleep(0.1)
        finally:
            for q in senders:
                await q.aclose()
            await consumer.stop(drain_s=1)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for batch in [*before, *during, *after]:  # one answer per call, its own
            assert [answer.results[0].score for _, answer in batch] == [len(text) for text, _ in batch]
        assert sum(len(batch) for batch in [*before, *during, *after]) == 30
        assert [q.resent for q in senders] == [5, 5]
        assert all(replica.script_exists(*TENANT_SCRIPTS))  # loaded again where senders now send
    finally:
        replica.close()
        await endpoint.stop()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
