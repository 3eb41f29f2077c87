"""One tenant against the others: the attacks of ``benchmarks/fault_injection.py --tenants``.

Each attack is a fault of a phase of ``fault_injection.py``: while a victim tenant (``trainer``)
sends the usual mixed load through HTTP and Redis with its own key, the attacker (``mallory``,
another tenant with a valid key and Redis user) does one thing the shared judge must survive.
Every phase checks what the victim saw (answered, nothing lost, no error), that ``/readyz`` stayed
200 and ``/healthz`` answered within 1 s, how much the server's memory grew, and what the attacker
got (a clear 4xx, a dead letter with its reason, a refused Redis write).

    t1  messages XADDed by hand into the attacker's own job stream: over the size limit, not UTF-8,
        not JSON
    t2  writes a tenant may not make (no TTL, other keys), then uploads written by hand without one
    t3  the OpenAI face: 100,000 stop strings; n x max_tokens x top log-probabilities
    t4  images: six requests at once, each at the request pixel budget (4 x 4096^2 solid PNGs)
    t5  admission: eight loops of the largest win-rate group the attacker may send
    t6  gathering: more open groups than the attacker's share, never filled
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import redis as redis_sync

from referee.acl import acl_rules, apply_acl
from referee.auth import hash_key, new_key
from referee.keys import Keys
from referee.protocol import ScoreItem, ScoreRequest
from referee.queue import QueueReferee

VICTIM, ATTACKER, OPERATOR = "trainer", "mallory", "ops"
TITLES = {
    "t1": "a tenant XADDs oversized, non-UTF-8 and non-JSON messages into its own job stream",
    "t2": "a tenant tries writes without a TTL, then writes uploads by hand without one",
    "t3": "a tenant floods the OpenAI face (stop strings, log-probability volume)",
    "t4": "a tenant sends six image requests at once, each at the request pixel budget",
    "t5": "a tenant keeps eight of its largest allowed win-rate requests waiting",
    "t6": "a tenant opens more gathered groups than its share and never fills them",
}
OPEN_GROUPS = 200  # limits.max_open_groups in the tenant run: the attacker's share is 100


@dataclass
class World:
    """The tenants of a ``--tenants`` run: keys, hashes, the Redis users."""

    prefix: str
    redis_port: int
    keys: dict[str, str] = field(default_factory=dict)
    server_password: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def create(cls, prefix: str, redis_port: int) -> World:
        w = cls(prefix, redis_port)
        w.keys = {name: new_key(name) for name in (VICTIM, ATTACKER, OPERATOR)}
        return w

    def tenants(self) -> list[dict]:
        return [{"name": n, "keys": [hash_key(k)]} for n, k in self.keys.items()]

    def server_url(self) -> str:
        return f"redis://referee-server:{self.server_password}@127.0.0.1:{self.redis_port}/0"

    def tenant_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def apply(self) -> None:
        admin = redis_sync.Redis(port=self.redis_port)
        try:
            rules = acl_rules(
                self.tenants(),
                prefix=self.prefix,
                server_password=self.server_password,
                disable_default=False,
            )
            apply_acl(admin, rules)
        finally:
            admin.close()

    def headers(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[name]}"}

    def redis_as(self, name: str) -> redis_sync.Redis:
        return redis_sync.Redis(port=self.redis_port, username=name, password=self.keys[name])


def solid_png(size: int, colour: tuple[int, int, int]) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(out, format="PNG")
    return out.getvalue()


class Memory:
    """The server process's resident memory, sampled every 0.2 s while a phase runs (the API process:
    where requests, images and buffers are held; the engines are other processes)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self._task: asyncio.Task | None = None

    async def _sample(self) -> None:
        while True:
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.proc.memory_info().rss)
            await asyncio.sleep(0.2)

    def __enter__(self) -> Memory:
        self._task = asyncio.get_running_loop().create_task(self._sample())
        return self

    def __exit__(self, *exc) -> None:
        self._task.cancel()

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.start) / 2**20


class TenantAttacks:
    """Mixed into ``fault_injection.Run``: ``self.server``, ``self.redis``, ``self.world``."""

    world: World

    def _client(self, name: str, timeout: float = 120) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.server.url, headers=self.world.headers(name), timeout=timeout)

    # ------------------------------------------------------------ t1

    async def attack_messages(self, phase) -> None:
        w = self.world
        keys = Keys(w.prefix, ATTACKER)
        job = "evil"
        # One normal message first: the job is listed as a sender would list it.
        async with QueueReferee(w.tenant_url(), job_id=job, prefix=w.prefix, api_key=w.keys[ATTACKER]) as q:
            rid = await q.send("score", ScoreRequest(items=[ScoreItem(prompt="q", response="a")]))
            await q.receive("score", rid, timeout=120)
        r = w.redis_as(ATTACKER)
        before = self.redis_admin().xlen(keys.dead_letter)
        hand = {
            "three of 20 MiB (queue.max_message_bytes is 8 MiB)": [b"x" * (20 << 20)] * 3,
            "one not UTF-8": [b'{"route": "score", \xff\xfe}'],
            "one not JSON": [b"not json at all"],
        }
        written = 0
        with Memory(self.server.proc.pid) as mem:
            for values in hand.values():
                for value in values:
                    r.xadd(keys.stream(job), {"msg": value})
                    written += 1
            deadline = time.monotonic() + 60
            dead = 0
            while time.monotonic() < deadline:
                dead = self.redis_admin().xlen(keys.dead_letter) - before
                if dead >= written:
                    break
                await asyncio.sleep(0.5)
        r.close()
        reasons = Counter()
        for _, fields in self.redis_admin().xrevrange(keys.dead_letter, count=written):
            text = {k.decode(): v.decode(errors="replace") for k, v in fields.items()}
            reasons[text.get("error", str(sorted(text)))[:70]] += 1
        phase.notes.append(
            f"the attacker's Redis user XADDed {written} messages by hand into its job stream "
            f"({'; '.join(hand)}); dead-lettered: {dead} of {written} ({dict(reasons)}); "
            f"server memory grew {mem.growth_mib:.0f} MiB at most"
        )
        phase.checks["attacker's messages dead-lettered with a reason"] = (
            dead >= written,
            f"{dead} of {written} in its dead-letter stream within 60 s",
        )
        phase.checks["server memory bounded (< 100 MiB growth)"] = (
            mem.growth_mib < 100,
            f"{mem.growth_mib:.0f} MiB (60 MiB of messages written)",
        )

    def redis_admin(self) -> redis_sync.Redis:
        if getattr(self, "_admin", None) is None:
            self._admin = redis_sync.Redis(port=self.redis.port)
        return self._admin

    # ------------------------------------------------------------ t2

    async def attack_keys(self, phase) -> None:
        w = self.world
        mine, theirs = Keys(w.prefix, ATTACKER), Keys(w.prefix, VICTIM)
        r = w.redis_as(ATTACKER)
        forbidden = {
            "SET a new key in its namespace": lambda: r.set(mine.namespace + "junk", "x" * 1000),
            "SET in the victim's namespace": lambda: r.set(theirs.namespace + "junk", "x"),
            "SET the shared limits": lambda: r.set(mine.limits, "{}"),
            "XADD its dead letters": lambda: r.xadd(mine.dead_letter, {"msg": "x"}),
            "LPUSH a reply": lambda: r.lpush(mine.reply("evil", "r1"), "x"),
            "SET a result marker": lambda: r.set(mine.result("evil", "r1"), "x"),
            "XADD the victim's stream": lambda: r.xadd(theirs.stream("load"), {"msg": "x"}),
            "FLUSHALL": lambda: r.flushall(),
        }
        refused = Counter()
        for what, write in forbidden.items():
            try:
                write()
                refused[f"ALLOWED: {what}"] += 1
            except redis_sync.exceptions.NoPermissionError:
                refused["NOPERM"] += 1
            except redis_sync.exceptions.ResponseError as exc:
                refused[str(exc)[:40]] += 1
        # What the upload script writes, made by hand: uploads without a TTL.
        made = []
        for i in range(15):
            raw = solid_png(64 + i, (i, 2 * i, 3 * i))
            key = mine.blob(hashlib.sha256(raw).hexdigest())
            with contextlib.suppress(redis_sync.exceptions.ResponseError):
                r.set(key, raw + b"\0" * (200 << 10))
                made.append(key)
        r.close()
        admin = self.redis_admin()
        deadline = time.monotonic() + 30
        immortal = len(made)
        while time.monotonic() < deadline:
            immortal = sum(1 for k in made if admin.ttl(k) == -1)
            if immortal == 0:
                break
            await asyncio.sleep(0.5)
        phase.notes.append(
            f"{len(forbidden)} writes a tenant may not make, tried with the attacker's Redis user: "
            f"{dict(refused)}; then {len(made)} uploads of 200 KiB written by hand without a TTL: "
            f"{immortal} still without one {time.monotonic() - deadline + 30:.0f}s later"
        )
        phase.checks["every forbidden write refused"] = (
            refused.get("NOPERM", 0) == len(forbidden),
            f"{refused.get('NOPERM', 0)} of {len(forbidden)} NOPERM",
        )
        phase.checks["hand-made uploads get a TTL or go"] = (
            immortal == 0,
            f"{immortal} of {len(made)} immortal",
        )

    # ------------------------------------------------------------ t3

    async def attack_openai(self, phase) -> None:
        base = {"model": "smollm2", "prompt": "Tell me a story.", "max_tokens": 128}
        bodies = {
            "100,000 stop strings, n 8": {**base, "n": 8, "stop": [f"s{i}" for i in range(100_000)]},
            # The most the run's limits allow (n is bounded by max_items, tokens by max_new_tokens):
            # 8 x 256 x 21 log-probability entries, built off the event loop.
            "n 8 x 256 tokens x 20 top log-probabilities": {
                **base,
                "n": 8,
                "max_tokens": 256,
                "logprobs": 20,
            },
            "n 64 x 256 tokens x 20 top log-probabilities": {
                **base,
                "n": 64,
                "max_tokens": 256,
                "logprobs": 20,
            },
        }
        seen = {}
        async with self._client(ATTACKER) as http:
            for what, body in bodies.items():
                t0 = time.monotonic()
                resp = await http.post("/v1/completions", json=body)
                msg = resp.json().get("message", resp.text[:80]) if resp.status_code != 200 else "ok"
                seen[what] = (resp.status_code, time.monotonic() - t0, msg[:90])
        phase.notes.append(
            "the attacker's /v1/completions: "
            + "; ".join(f"{w}: {s} after {t:.2f}s ({m})" for w, (s, t, m) in seen.items())
        )
        phase.checks["attacker's floods refused with a 4xx, the largest allowed answered"] = (
            all(400 <= s < 500 for w, (s, _, _) in seen.items() if "n 8 x" not in w)
            and seen["n 8 x 256 tokens x 20 top log-probabilities"][0] == 200,
            ", ".join(str(s) for s, _, _ in seen.values()),
        )

    # ------------------------------------------------------------ t4

    async def attack_pixels(self, phase) -> None:
        side = 4096
        colours = [(10 * i, 200 - 10 * i, 40 + i) for i in range(24)]
        # Encoded in a thread: this process's event loop also runs the victim's clients and the
        # probes, and a stall here would be measured as the server's (and once cut off the
        # victim's reads of popped replies: tests/queue/test_lost_reply.py).
        pngs = await asyncio.gather(*(asyncio.to_thread(solid_png, side, c) for c in colours))
        out = Counter()

        async def one(k: int) -> None:
            images = pngs[4 * k : 4 * k + 4]
            body = {
                "judge": "tiny-clip",
                "items": [
                    {
                        "prompt": "a photo",
                        "response": [{"type": "image", "data": base64.b64encode(raw).decode()}],
                    }
                    for raw in images
                ],
            }
            async with self._client(ATTACKER, timeout=300) as http:
                resp = await http.post("/score", json=body)
                out[f"{resp.status_code} {resp.json().get('error', '')}".strip()] += 1

        with Memory(self.server.proc.pid) as mem:
            await asyncio.gather(*(one(k) for k in range(6)))
        each = 4 * side * side
        phase.notes.append(
            f"6 /score requests to tiny-clip at once, each 4 solid PNGs of {side}x{side} "
            f"({each / 2**20:.0f} Mi pixels, {3 * each / 2**20:.0f} MiB of RGB, "
            f"{sum(len(p) for p in pngs[:4]) // 1024} KiB on the wire): {dict(out)}; server memory grew "
            f"{mem.growth_mib:.0f} MiB at most"
        )
        phase.checks["decoded images bounded (< 600 MiB growth for 1,152 MiB of pixels asked)"] = (
            mem.growth_mib < 600,
            f"{mem.growth_mib:.0f} MiB",
        )
        phase.checks["attacker answered 200 or a clear 4xx"] = (
            all(k.startswith(("200", "4")) for k in out),
            str(dict(out)),
        )

    # ------------------------------------------------------------ t5

    async def attack_admission(self, phase) -> None:
        out = Counter()
        stop = asyncio.Event()

        async def loop(k: int) -> None:
            async with self._client(ATTACKER, timeout=300) as http:
                i = 0
                while not stop.is_set():
                    i += 1
                    body = {
                        "prompt": f"Write a haiku ({k}.{i})",
                        "responses": [f"draft {j} of {k}.{i}" for j in range(4)],
                        "order": "both",
                    }
                    resp = await http.post("/winrate", json=body)
                    out[resp.status_code] += 1
                    if resp.status_code == 429:
                        await asyncio.sleep(float(resp.headers.get("retry-after", 1)))

        tasks = [asyncio.create_task(loop(k)) for k in range(8)]
        await asyncio.sleep(40)
        too_big = {}
        async with self._client(ATTACKER) as http:
            body = {"prompt": "q", "responses": [f"r{j}" for j in range(8)], "order": "both"}
            resp = await http.post("/winrate", json=body)
            too_big = (resp.status_code, resp.json().get("message", "")[:100])
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        phase.notes.append(
            "8 loops of the attacker's /winrate (groups of 4, both orders: 12 engine requests each) for "
            f"40 s: answers {dict(out)}; one group of 8 in both orders (56 engine requests, over the "
            f"tenant's share of 16): {too_big[0]} ({too_big[1]})"
        )
        phase.checks["a request over the tenant's share is 413"] = (too_big[0] == 413, str(too_big[0]))

    # ------------------------------------------------------------ t6

    async def attack_gathering(self, phase) -> None:
        n = OPEN_GROUPS  # the attacker's share is half of them
        out = Counter()
        params = {"reward": "winrate", "group_size": 4, "group_timeout_s": 60}

        async def open_group(http: httpx.AsyncClient, k: int) -> None:
            with contextlib.suppress(httpx.TimeoutException):
                resp = await http.post(
                    "/slime/reward", params=params, json={"prompt": f"evil {k}", "response": "alone"}
                )
                out[resp.status_code] += 1

        limits = httpx.Limits(max_connections=n + 10)
        async with httpx.AsyncClient(
            base_url=self.server.url, headers=self.world.headers(ATTACKER), timeout=20, limits=limits
        ) as evil:
            holders = [asyncio.create_task(open_group(evil, k)) for k in range(n)]
            await asyncio.sleep(5)  # the refused ones come back at once; the rest wait for company
            refused_early = dict(out)
            victim = Counter()
            async with self._client(VICTIM) as http:

                async def sample(r: str) -> None:
                    resp = await http.post(
                        "/slime/reward",
                        params={**params, "group_size": 2},
                        json={"prompt": "the victim's prompt", "response": r},
                    )
                    victim[resp.status_code] += 1

                await asyncio.gather(sample("one"), sample("two"))
            for t in holders:
                t.cancel()
            await asyncio.gather(*holders, return_exceptions=True)
        phase.notes.append(
            f"the attacker opened {n} gathered groups (one sample each, never filled; limits.max_open_groups "
            f"{OPEN_GROUPS}, its share {OPEN_GROUPS // 2}): answers within 5 s {refused_early}; then the "
            f"victim's group of 2: {dict(victim)}; the attacker's waiting calls were then dropped"
        )
        phase.checks["attacker held at its share (429 past it)"] = (
            refused_early.get(429, 0) >= n - OPEN_GROUPS // 2,
            f"{refused_early.get(429, 0)} of {n} refused 429",
        )
        phase.checks["victim's gathered group answered"] = (victim.get(200, 0) == 2, str(dict(victim)))


def write_tenant_config(config: dict, world: World, root: Path) -> dict:
    """The run's config with tenants: the queue logs in as the server's Redis user, a tiny CLIP judge
    takes images, gathered groups are bounded small enough to reach."""
    from tests.model_factory import make_tiny_clip

    corpus = Path(__file__).resolve().parent.parent / "tests" / "data" / "hh_harmless_subset.jsonl"
    clip = make_tiny_clip(root / "tiny-clip", corpus)
    config = {**config, "tenants": world.tenants(), "operators": [OPERATOR]}
    config["queue"] = {**config["queue"], "url": world.server_url(), "cleanup_every_s": 2.0}
    # Bodies large enough for the image attack (four 4096² PNGs); groups few enough to reach.
    config["limits"] = {**config["limits"], "max_open_groups": OPEN_GROUPS, "max_body_bytes": 16 << 20}
    config["judges"] = [
        *config["judges"],
        {
            "name": "tiny-clip",
            "kind": "clip",
            "model": str(clip),
            "engine": {"dtype": "float32", "max_model_len": 77, "kv_cache_memory_gib": 0.0625},
        },
    ]
    return config
