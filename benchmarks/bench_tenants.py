"""Three tenants sharing one judge through HTTP and Redis at once: weighted shares, the small
tenant's latency beside a flood, and the throughput cost of sharing.

Starts ``referee serve`` with the embedded SmolLM2 judge (256-token engine steps), the Redis queue
consumer and three tenants, each with its own API key and Redis ACL user (``referee.acl``):

- ``big``   weight 2: four training jobs through the Redis queue (``QueueReferee``), each a closed
  loop keeping ``--big-inflight`` requests in flight;
- ``mid``   weight 1: HTTP, a closed loop keeping ``--mid-inflight`` requests in flight (always
  backlogged: it would take the whole judge if it could);
- ``flood`` weight 1: an open loop offering ``--flood-factor`` (10) times its fair share of the
  judge, half over HTTP and half through the queue (one job each), so its backlog keeps growing.

Every request is ``/pairwise``, logprob verdict, ``order=single`` (one engine request per item), on
HH-RLHF harmless dev rows (``../shared/data/hh_harmless_dev.jsonl``, never printed) cut to 600 / 300
/ 300 characters (about 200-400 prompt tokens per item); each item starts with a unique tag so no
request reuses another's prefix cache beyond the judge's instructions. One run, one server:

1. ``alone``: ``mid`` alone, saturating (``--alone-inflight`` requests in flight): the throughput
   baseline;
2. ``mid latency alone``: ``mid`` asking one one-item question at a time;
3. ``shared``: all three tenants at once; after ``--warmup`` s, items judged per tenant in a
   ``--seconds`` window, against the weights (expected 50 / 25 / 25 %), cross-checked with the
   server's ``referee_tenant_engine_requests_total`` deltas; total throughput against phase 1;
4. ``mid latency beside flood+big``: ``mid`` back to one question at a time while ``big`` and the
   flood go on (and, for scale, the engine requests in flight that a first-come-first-served
   probe would have waited behind);
5. ``alone again``: the queued backlog dropped and the server drained, ``mid`` alone as in phase 1,
   to tell drift in the machine's speed from the cost of sharing.

CPU use (cores) of the API process, the engine processes, this script, redis-server and everything
else is recorded for phases 1, 3 and 5. Writes ``--output`` (JSON) and prints a table; about 7
minutes. Must run alone on the machine's cores (under the shared lock in this project):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_tenants.py --seconds 75
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "hh_harmless_dev.jsonl"
WEIGHTS = {"big": 2.0, "mid": 1.0, "flood": 1.0}


# ------------------------------------------------------------------ workload


def load_items() -> list[dict[str, str]]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    return [
        {"prompt": r["prompt"][:600], "response_a": r["chosen"][:300], "response_b": r["rejected"][:300]}
        for r in rows
    ]


class Items:
    """Items drawn in a seeded order, each with a unique tag at the start of its conversation (so a
    repeated row is not a prefix-cache hit)."""

    def __init__(self, rows: list[dict[str, str]], seed: int = 0) -> None:
        self.rows = rows
        self.rng = random.Random(seed)
        self.n = itertools.count()

    def take(self, k: int) -> list[dict[str, str]]:
        out = []
        for _ in range(k):
            i = next(self.n)
            r = self.rows[self.rng.randrange(len(self.rows))]
            out.append({**r, "prompt": f"[conversation {i}]\n{r['prompt']}"})
        return out


def body(items: list[dict[str, str]]) -> dict:
    return {"judge": "smollm2", "mode": "logprob", "order": "single", "items": items}


@dataclass
class Done:
    t: float  # completion, monotonic
    tenant: str
    via: str  # http / queue
    items: int
    tokens: int
    latency: float
    ok: bool
    label: str = ""  # which load sent it (phase)


@dataclass
class Log:
    events: list[Done] = field(default_factory=list)

    def add(self, *a, **kw) -> None:
        self.events.append(Done(*a, **kw))


# ------------------------------------------------------------------ clients


async def http_call(client: httpx.AsyncClient, headers: dict, items: list) -> tuple[bool, int]:
    resp = await client.post("/pairwise", json=body(items), headers=headers)
    if resp.status_code != 200:
        return False, 0
    answer = resp.json()  # every item was judged (an invalid verdict is an answer too)
    return len(answer["results"]) == len(items), answer["usage"]["prompt_tokens"]


async def queue_call(ref, items: list) -> tuple[bool, int]:
    from referee.client import APIError

    try:
        answer = await ref.pairwise(**body(items))
    except APIError:
        return False, 0
    return len(answer.results) == len(items), answer.usage.prompt_tokens


async def timed(log: Log, tenant: str, via: str, label: str, k: int, call) -> None:
    t0 = time.monotonic()
    try:
        ok, tokens = await call
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # counted, not fatal: the run goes on
        print(f"  {tenant}/{via}: {type(exc).__name__}: {exc}", file=sys.stderr)
        ok, tokens = False, 0
    t1 = time.monotonic()
    log.add(t1, tenant, via, k if ok else 0, tokens, t1 - t0, ok, label)


async def closed_loop(n: int, stop: asyncio.Event, one) -> None:
    """``n`` workers, each sending its next request when its last one returns, until ``stop``."""

    async def worker() -> None:
        while not stop.is_set():
            await one()

    await asyncio.gather(*[worker() for _ in range(n)])


async def open_loop(rate: float, stop: asyncio.Event, ones: list, cap: int, tasks: set) -> dict:
    """Poisson arrivals at ``rate`` requests/s, alternating over ``ones``; at most ``cap`` requests
    outstanding (arrivals past it are counted as skipped)."""
    rng = random.Random(1)
    sent = skipped = 0
    for i in itertools.count():
        if stop.is_set():
            break
        if len(tasks) < cap:
            task = asyncio.create_task(ones[i % len(ones)]())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        else:
            skipped += 1
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), rng.expovariate(rate))
    return {"sent": sent, "skipped": skipped}


# ------------------------------------------------------------------ server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(config: Path, log_path: Path, timeout: float = 600) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {"HF_HUB_OFFLINE": "1", **os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("REFEREE_CONFIG", None)
    with open(log_path, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "referee.cli", "serve", "--config", str(config), "--port", str(port)],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        time.sleep(1)
    stop_server(proc)
    raise RuntimeError(f"the server did not become ready (exit code {proc.returncode}); see {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


METRIC = re.compile(
    r'^(referee_tenant_engine_requests_total|referee_tenant_tokens_total)\{tenant="([^"]+)"\} (\S+)$'
)


async def scrape(client: httpx.AsyncClient, headers: dict) -> dict[str, dict[str, float]]:
    text = (await client.get("/metrics", headers=headers)).text
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if line.startswith("referee_inflight_engine_requests "):
            out["inflight"] = {"": float(line.split()[1])}
        if m := METRIC.match(line):
            out.setdefault(m.group(1), {})[m.group(2)] = float(m.group(3))
    return out


class CpuMeter:
    """CPU seconds used so far by the server's API process, its engine processes (its children),
    this benchmark, redis-server, and everything else on the machine."""

    def __init__(self, server_pid: int) -> None:
        import psutil

        self.psutil = psutil
        self.api = psutil.Process(server_pid)
        self.me = psutil.Process()
        self.redis = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "redis-server"]

    @staticmethod
    def _cpu(p) -> float:
        try:
            t = p.cpu_times()
            return t.user + t.system
        except Exception:
            return 0.0

    def snapshot(self) -> dict[str, float]:
        t = self.psutil.cpu_times()
        busy = t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)
        engine = sum(self._cpu(c) for c in self.api.children(recursive=True))
        out = {
            "api": self._cpu(self.api),
            "engine": engine,
            "bench": self._cpu(self.me),
            "redis": sum(self._cpu(p) for p in self.redis),
            "machine": busy,
            "t": time.monotonic(),
        }
        return out

    @staticmethod
    def cores(a: dict, b: dict) -> dict[str, float]:
        """Cores in use between two snapshots, by part; ``others``: the machine less the parts."""
        dt_ = b["t"] - a["t"]
        out = {k: (b[k] - a[k]) / dt_ for k in ("api", "engine", "bench", "redis", "machine")}
        out["others"] = out["machine"] - out["api"] - out["engine"] - out["bench"] - out["redis"]
        return out


# ------------------------------------------------------------------ analysis


def window_stats(events: list[Done], t0: float, t1: float, names: dict[str, str]) -> dict:
    """Items and tokens judged per tenant (base name) with completion in [t0, t1)."""
    per = {b: {"items": 0, "tokens": 0, "requests": 0, "errors": 0} for b in names}
    for e in events:
        if t0 <= e.t < t1:
            base = next(b for b, n in names.items() if n == e.tenant)
            per[base]["items"] += e.items
            per[base]["tokens"] += e.tokens
            per[base]["requests"] += 1
            per[base]["errors"] += 0 if e.ok else 1
    return per


def latency_stats(values: list[float]) -> dict:
    values = sorted(values)
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "median_s": statistics.median(values),
        "mean_s": statistics.fmean(values),
        "p95_s": values[min(len(values) - 1, int(0.95 * len(values)))],
        "max_s": values[-1],
    }


def shares(counts: dict[str, float]) -> dict[str, float]:
    total = sum(counts.values()) or 1
    return {k: v / total for k, v in counts.items()}


# ------------------------------------------------------------------ the run


async def run(
    args, url: str, redis_url: str, prefix: str, names: dict[str, str], keys: dict[str, str], pid: int
) -> dict:
    from referee.queue import QueueReferee

    cpu = CpuMeter(pid)

    items = Items(load_items(), seed=args.seed)
    log = Log()
    k = args.items_per_request
    hdr = {b: {"Authorization": f"Bearer {keys[b]}"} for b in names}
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=4096)
    client = httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(900, connect=30), limits=limits)
    queue_refs = []

    def qref(base: str, job: str) -> QueueReferee:
        ref = QueueReferee(redis_url, job_id=job, api_key=keys[base], prefix=prefix, timeout=900)
        queue_refs.append(ref)
        return ref

    def http_one(base: str, label: str, n: int, job: str | None = None):
        headers = {**hdr[base], **({"X-Referee-Job": job} if job else {})}

        def one():
            return timed(log, names[base], "http", label, n, http_call(client, headers, items.take(n)))

        return one

    def queue_one(base: str, ref, label: str, n: int):
        def one():
            return timed(log, names[base], "queue", label, n, queue_call(ref, items.take(n)))

        return one

    async def sequential(label: str, seconds: float) -> list[float]:
        one = http_one("mid", label, args.probe_items)
        t_end = time.monotonic() + seconds
        start = len(log.events)
        while time.monotonic() < t_end:
            await one()
        return [e.latency for e in log.events[start:] if e.label == label and e.ok]

    phases: dict = {}
    try:
        # warm-up: compile paths, fill the instructions' prefix cache of each tenant
        for base in names:
            await http_call(client, hdr[base], items.take(2))
        await queue_call(qref("big", "warmup"), items.take(2))

        # ---------------------------------------------------------- 1. mid alone, saturating
        print(f"phase 1: mid alone, {args.alone_inflight} x {k} items in flight", flush=True)
        stop = asyncio.Event()
        load = asyncio.create_task(closed_loop(args.alone_inflight, stop, http_one("mid", "alone", k)))
        await asyncio.sleep(args.warmup)
        m0, t0, c0 = await scrape(client, hdr["mid"]), time.monotonic(), cpu.snapshot()
        await asyncio.sleep(args.seconds)
        m1, t1, c1 = await scrape(client, hdr["mid"]), time.monotonic(), cpu.snapshot()
        stop.set()
        await load
        w = window_stats(log.events, t0, t1, names)
        alone_items = w["mid"]["items"] / (t1 - t0)
        phases["alone"] = {
            "window_s": t1 - t0,
            "cores": CpuMeter.cores(c0, c1),
            "per_tenant": w,
            "items_per_s": alone_items,
            "prompt_tokens_per_s": w["mid"]["tokens"] / (t1 - t0),
            "engine_requests_per_s_metrics": (
                m1["referee_tenant_engine_requests_total"].get(names["mid"], 0)
                - m0["referee_tenant_engine_requests_total"].get(names["mid"], 0)
            )
            / (t1 - t0),
        }
        print(f"  {alone_items:.2f} items/s", flush=True)

        # ---------------------------------------------------------- 2. mid's latency alone
        print(f"phase 2: mid sequential, alone, {args.latency_seconds:.0f} s", flush=True)
        lat_alone = await sequential("latency alone", args.latency_seconds)
        phases["mid latency alone"] = latency_stats(lat_alone)

        # ---------------------------------------------------------- 3. all three tenants
        flood_rate_items = args.flood_factor * alone_items * WEIGHTS["flood"] / sum(WEIGHTS.values())
        print(
            f"phase 3: shared; flood offers {flood_rate_items:.2f} items/s "
            f"({args.flood_factor:g}x its share of {alone_items:.2f})",
            flush=True,
        )
        stop_mid, stop_rest = asyncio.Event(), asyncio.Event()
        loads = []
        for j in range(args.big_jobs):
            ref = qref("big", f"train-{j}")
            loads.append(
                asyncio.create_task(
                    closed_loop(args.big_inflight, stop_rest, queue_one("big", ref, "shared", k))
                )
            )
        mid_load = asyncio.create_task(closed_loop(args.mid_inflight, stop_mid, http_one("mid", "shared", k)))
        flood_tasks: set = set()
        flood_ones = [
            http_one("flood", "shared", k, job="flood-http"),
            queue_one("flood", qref("flood", "flood-q"), "shared", k),
        ]
        flood = asyncio.create_task(
            open_loop(flood_rate_items / k, stop_rest, flood_ones, args.flood_cap, flood_tasks)
        )
        t_start = time.monotonic()
        await asyncio.sleep(args.warmup)
        m0, t0, c0 = await scrape(client, hdr["mid"]), time.monotonic(), cpu.snapshot()
        await asyncio.sleep(args.seconds)
        m1, t1, c1 = await scrape(client, hdr["mid"]), time.monotonic(), cpu.snapshot()
        w = window_stats(log.events, t0, t1, names)
        counts = {b: w[b]["items"] for b in names}
        engine = {
            b: m1["referee_tenant_engine_requests_total"].get(names[b], 0)
            - m0["referee_tenant_engine_requests_total"].get(names[b], 0)
            for b in names
        }
        tokens_m = {
            b: m1.get("referee_tenant_tokens_total", {}).get(names[b], 0)
            - m0.get("referee_tenant_tokens_total", {}).get(names[b], 0)
            for b in names
        }
        thirds = []
        step = (t1 - t0) / 3
        for i in range(3):
            wi = window_stats(log.events, t0 + i * step, t0 + (i + 1) * step, names)
            thirds.append(shares({b: wi[b]["items"] for b in names}))
        expected = {b: WEIGHTS[b] / sum(WEIGHTS.values()) for b in names}
        total_items = sum(counts.values()) / (t1 - t0)
        offered_flood = [e for e in log.events if e.tenant == names["flood"]]
        phases["shared"] = {
            "window_s": t1 - t0,
            "cores": CpuMeter.cores(c0, c1),
            "per_tenant": w,
            "expected_share": expected,
            "item_share": shares(counts),
            "item_share_over_expected": {b: shares(counts)[b] / expected[b] for b in names},
            "metrics_engine_requests": engine,
            "metrics_engine_share": shares(engine),
            "metrics_token_share": shares(tokens_m),
            "client_token_share": shares({b: w[b]["tokens"] for b in names}),
            "item_share_by_third": thirds,
            "items_per_s": total_items,
            "prompt_tokens_per_s": sum(w[b]["tokens"] for b in names) / (t1 - t0),
            "throughput_vs_alone": total_items / alone_items,
            "tokens_vs_alone": (sum(w[b]["tokens"] for b in names) / (t1 - t0))
            / phases["alone"]["prompt_tokens_per_s"],
            "flood_offered_items_per_s": flood_rate_items,
            "flood_outstanding_http_and_queue_at_end": len(flood_tasks),
            "flood_completed_requests_so_far": len(offered_flood),
            "since_start_s": t1 - t_start,
        }
        print(f"  shares {phases['shared']['item_share']}, total {total_items:.2f} items/s", flush=True)

        # ---------------------------------------------------------- 4. mid's latency beside the flood
        stop_mid.set()
        t_drain = time.monotonic()
        await mid_load  # mid's closed-loop requests finish (its own backlog would delay its probe)
        drain_s = time.monotonic() - t_drain
        print(f"phase 4: mid sequential beside flood+big (mid drained in {drain_s:.1f} s)", flush=True)
        inflight = (await scrape(client, hdr["mid"])).get("inflight", {}).get("", 0.0)
        lat_beside = await sequential("latency beside", args.latency_seconds)
        phases["mid latency beside flood+big"] = latency_stats(lat_beside)
        # first-come-first-served, a probe would queue behind every engine request in flight
        phases["mid latency beside flood+big"]["engine_requests_in_flight_at_start"] = inflight
        phases["mid latency beside flood+big"]["fcfs_wait_estimate_s"] = inflight / total_items
        phases["mid latency beside flood+big"]["flood_outstanding_at_end"] = len(flood_tasks)
        phases["mid_drain_s"] = drain_s
        t_end = time.monotonic()
        wb = window_stats(log.events, t_end - args.latency_seconds, t_end, names)
        phases["mid latency beside flood+big"]["items_judged_per_tenant"] = {b: wb[b]["items"] for b in names}

        stop_rest.set()
        flood_stats = await flood
        phases["flood_open_loop"] = flood_stats
        for task in list(flood_tasks):
            task.cancel()
        for task in loads:
            task.cancel()
        await asyncio.gather(*loads, *flood_tasks, return_exceptions=True)

        # ---------------------------------------------------------- 5. mid alone again (drift check)
        import redis.asyncio as aredis

        from referee.keys import Keys

        admin = aredis.Redis.from_url(redis_url)
        jobs = [("big", f"train-{j}") for j in range(args.big_jobs)] + [("flood", "flood-q")]
        for base, job in jobs:  # the queued backlog nobody waits for any more
            await admin.xtrim(Keys(prefix, names[base]).stream(job), maxlen=0)
        await admin.aclose()
        t_drain = time.monotonic()
        while time.monotonic() - t_drain < 120:
            if (await scrape(client, hdr["mid"])).get("inflight", {}).get("", 1) == 0:
                break
            await asyncio.sleep(1)
        print(f"phase 5: mid alone again (server drained in {time.monotonic() - t_drain:.0f} s)", flush=True)
        stop = asyncio.Event()
        load = asyncio.create_task(closed_loop(args.alone_inflight, stop, http_one("mid", "alone again", k)))
        await asyncio.sleep(args.warmup)
        t0, c0 = time.monotonic(), cpu.snapshot()
        await asyncio.sleep(args.seconds)
        t1, c1 = time.monotonic(), cpu.snapshot()
        stop.set()
        await load
        w = window_stats(log.events, t0, t1, names)
        phases["alone again"] = {
            "window_s": t1 - t0,
            "cores": CpuMeter.cores(c0, c1),
            "per_tenant": w,
            "items_per_s": w["mid"]["items"] / (t1 - t0),
            "prompt_tokens_per_s": w["mid"]["tokens"] / (t1 - t0),
        }
        s_ = phases["shared"]
        s_["throughput_vs_alone_mean"] = s_["items_per_s"] / statistics.fmean(
            [phases["alone"]["items_per_s"], phases["alone again"]["items_per_s"]]
        )
    finally:
        await client.aclose()
        for ref in queue_refs:
            with contextlib.suppress(Exception):
                await ref.aclose()
    errors = {b: sum(1 for e in log.events if e.tenant == names[b] and not e.ok) for b in names}
    phases["errors"] = errors
    return phases


def table(res: dict) -> str:
    a, s, again = res["phases"]["alone"], res["phases"]["shared"], res["phases"]["alone again"]
    la, lb = res["phases"]["mid latency alone"], res["phases"]["mid latency beside flood+big"]
    lines = [
        "| tenant | weight | via | expected share | items judged | item share | share ÷ expected "
        "| engine-request share (/metrics) | prompt-token share |",
        "|---|--:|---|--:|--:|--:|--:|--:|--:|",
    ]
    via = {"big": f"queue, {res['args']['big_jobs']} jobs", "mid": "HTTP", "flood": "HTTP + queue"}
    for b in WEIGHTS:
        lines.append(
            f"| {b} | {WEIGHTS[b]:g} | {via[b]} | {s['expected_share'][b]:.1%} "
            f"| {s['per_tenant'][b]['items']} | {s['item_share'][b]:.1%} "
            f"| **{s['item_share_over_expected'][b]:.2f}** | {s['metrics_engine_share'][b]:.1%} "
            f"| {s['client_token_share'][b]:.1%} |"
        )
    probe = f"{res['args']['probe_items']}-item"
    flood_x = s["flood_offered_items_per_s"] / (s["items_per_s"] * s["expected_share"]["flood"])
    thirds = " ; ".join("/".join(f"{t[b]:.1%}" for b in WEIGHTS) for t in s["item_share_by_third"])
    lines += [
        "",
        "| measurement | value |",
        "|---|--:|",
        f"| mid alone, saturating: items/s | {a['items_per_s']:.2f} |",
        f"| three tenants: items/s | {s['items_per_s']:.2f} |",
        f"| three tenants ÷ alone (items) | **{s['throughput_vs_alone']:.2f}** |",
        f"| three tenants ÷ alone (prompt tokens) | {s['tokens_vs_alone']:.2f} |",
        f"| mid alone again, after the shared phases: items/s | {again['items_per_s']:.2f} |",
        f"| three tenants ÷ mean of the two alone phases (items) | {s['throughput_vs_alone_mean']:.2f} |",
        f"| flood offered items/s (÷ its share of the shared rate) | {s['flood_offered_items_per_s']:.2f} "
        f"({flood_x:.1f}x) |",
        f"| item shares big/mid/flood by third of the window | {thirds} |",
        f"| mid {probe} latency alone: median / p95 s (n) "
        f"| {la['median_s']:.3f} / {la['p95_s']:.3f} ({la['n']}) |",
        f"| mid {probe} latency beside flood+big: median / p95 s (n) "
        f"| {lb['median_s']:.3f} / {lb['p95_s']:.3f} ({lb['n']}) |",
        f"| beside ÷ alone (median) | **{lb['median_s'] / la['median_s']:.2f}** |",
        f"| engine requests in flight as the probe began (first-come-first-served wait ≈) "
        f"| {lb['engine_requests_in_flight_at_start']:.0f} ({lb['fcfs_wait_estimate_s']:.0f} s) |",
    ]
    lines += ["", "| phase | API | engine | benchmark clients | redis | other processes | machine |"]
    lines.append("|---|--:|--:|--:|--:|--:|--:|")
    for name in ("alone", "shared", "alone again"):
        c = res["phases"][name]["cores"]
        parts = " | ".join(f"{c[k]:.2f}" for k in ("api", "engine", "bench", "redis", "others", "machine"))
        lines.append(f"| {name} (cores busy) | {parts} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=75, help="measured window of each saturated phase")
    parser.add_argument("--warmup", type=float, default=15, help="discarded start of each saturated phase")
    parser.add_argument("--latency-seconds", type=float, default=30, help="length of each latency phase")
    parser.add_argument("--items-per-request", type=int, default=2)
    parser.add_argument("--probe-items", type=int, default=1, help="items per latency-probe request")
    parser.add_argument("--alone-inflight", type=int, default=8, help="mid's requests in flight, alone")
    parser.add_argument("--mid-inflight", type=int, default=3, help="mid's requests in flight, shared")
    parser.add_argument("--big-jobs", type=int, default=4)
    parser.add_argument("--big-inflight", type=int, default=3, help="requests in flight per big job")
    parser.add_argument("--flood-factor", type=float, default=10.0)
    parser.add_argument("--flood-cap", type=int, default=1000, help="flood's outstanding requests at most")
    parser.add_argument("--step-tokens", type=int, default=256, help="vLLM max_num_batched_tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("/tmp/bench_tenants/results.json"))
    args = parser.parse_args()

    import redis

    from referee.acl import acl_rules, apply_acl, remove_users
    from referee.auth import hash_key, new_key

    args.output.parent.mkdir(parents=True, exist_ok=True)
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    tag = uuid.uuid4().hex[:6]
    prefix = f"referee-bench-tenants-{tag}"
    names = {b: f"{b}-{tag}" for b in WEIGHTS}  # Redis ACL users are global: unique names
    keys = {b: new_key(names[b]) for b in WEIGHTS}
    tenants = [{"name": names[b], "weight": WEIGHTS[b], "keys": [hash_key(keys[b])]} for b in WEIGHTS]
    config = {
        "judges": [
            {
                "name": "smollm2",
                "kind": "generative",
                "model": "embedded:smollm2",
                "engine": {
                    "dtype": "auto",
                    "max_model_len": 2048,
                    "kv_cache_memory_gib": 1.0,
                    "extra": {"max_num_batched_tokens": args.step_tokens},
                },
            }
        ],
        "queue": {
            "enabled": True,
            "url": redis_url,
            "prefix": prefix,
            "block_ms": 50,
            "shutdown_grace_s": 1.0,
        },
        "tenants": tenants,
    }
    path = args.output.parent / "judges.yaml"
    path.write_text(yaml.safe_dump(config))
    server_log = args.output.parent / "server.log"
    admin = redis.Redis.from_url(redis_url)
    users = apply_acl(admin, acl_rules(tenants, prefix=prefix, disable_default=False))
    proc = None
    started = time.monotonic()
    try:
        proc, url = start_server(path, server_log)
        ready_s = time.monotonic() - started
        print(f"server ready in {ready_s:.0f} s at {url}", flush=True)
        phases = asyncio.run(run(args, url, redis_url, prefix, names, keys, proc.pid))
    finally:
        if proc is not None:
            stop_server(proc)
        remove_users(admin, users)
        stale = list(admin.scan_iter(f"{prefix}:*", count=1000))
        if stale:
            admin.delete(*stale)
        admin.close()
    import vllm

    from reward_server.hardware import cpu_info

    info = cpu_info()
    result = {
        "date": dt.date.today().isoformat(),
        "command": "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_tenants.py " + " ".join(sys.argv[1:]),
        "machine": f"{os.cpu_count()} cores, native bf16 {info.native_bf16}, vllm {vllm.__version__}",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "weights": WEIGHTS,
        "queue_consumer": {
            "per_job_inflight_messages": 8,
            "max_inflight_messages": 64,
            "read_count": 2,
            "block_ms": 50,
        },
        "server_ready_s": ready_s,
        "wall_s": time.monotonic() - started,
        "phases": phases,
    }
    args.output.write_text(json.dumps(result, indent=2))
    print()
    print(table(result))
    print(f"\nerrors: {phases['errors']}; results: {args.output}")


if __name__ == "__main__":
    main()
