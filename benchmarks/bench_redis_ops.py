"""What one queued message costs Redis, and where one Redis instance stops.

Starts a redis-server of its own (no persistence, loopback), a real ``QueueConsumer`` with a
stand-in judge that answers at once (the judge is not what is measured), and ``QueueReferee``
senders; then, after a warm-up, ``CONFIG RESETSTAT`` and ``--messages`` score requests from
``--senders`` concurrent calls. It reports:

- commands *sent* per message: counted in the clients, as redis-py packs them (sender and consumer,
  housekeeping included: heartbeats, reclaim scans, backlog, announcements, the idle reads);
- commands *executed* per message, those run inside the Lua scripts included
  (``INFO commandstats``), by command;
- Redis' own CPU time per message (``INFO cpu``, user + system of the server process), and from
  it the ceiling of one instance: messages per second at one busy core. The clients here run in
  one Python process on the same two cores, so what they reach is far below that ceiling;
- ``redis-benchmark`` on the same instance (simple ``SET``/``GET``, 50 clients, no pipelining),
  for the per-operation estimate of the issue (ops/s divided by commands per message).

    .venv/bin/python benchmarks/bench_redis_ops.py [--messages 3000] [--senders 32] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import redis as redis_sync
from redis.asyncio.connection import AbstractConnection

from referee.protocol import JudgesResponse, ScoreItem, ScoreResponse, ScoreResult, Usage
from referee.queue import QueueReferee
from reward_server.consumer import QueueConsumer
from reward_server.settings import QueueSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_hh import _free_port, write_section

SENT: Counter = Counter()  # commands packed by redis-py's async connections, by name


def _count_sent() -> None:
    """Count every command the async clients send (one by one and in pipelines)."""
    one, many = AbstractConnection.pack_command, AbstractConnection.pack_commands

    def pack_command(self, *args):
        SENT[str(args[0]).upper()] += 1
        return one(self, *args)

    def pack_commands(self, commands):
        commands = list(commands)
        for cmd in commands:
            SENT[str(cmd[0]).upper()] += 1
        return many(self, commands)

    AbstractConnection.pack_command = pack_command
    AbstractConnection.pack_commands = pack_commands


class Echo:
    """A judge that answers at once: what is measured is the queue."""

    ready = True
    load_error = None

    def describe(self) -> JudgesResponse:
        return JudgesResponse(default="echo", judges=[])

    async def score(self, request, *, tenant: str, job: str, queued: bool = False) -> ScoreResponse:
        results = [ScoreResult(index=i, score=len(it.response)) for i, it in enumerate(request.items)]
        return ScoreResponse(judge="echo", results=results, usage=Usage())


def _commandstats(r: redis_sync.Redis) -> Counter:
    out: Counter = Counter()
    for name, stats in r.info("commandstats").items():
        command = name.removeprefix("cmdstat_").upper()
        if command.split("|")[0] in ("INFO", "CONFIG"):  # the benchmark's own
            continue
        out[command] = int(stats["calls"])
    return out


def _redis_cpu(r: redis_sync.Redis) -> float:
    cpu = r.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


async def _run(port: int, messages: int, senders: int, jobs: int) -> dict:
    url, prefix = f"redis://127.0.0.1:{port}/0", f"bench-{uuid.uuid4().hex[:6]}"
    settings = QueueSettings(url=url, prefix=prefix, consumer_name="bench", max_inflight_messages=256)
    consumer = QueueConsumer(Echo(), settings)
    task = asyncio.create_task(consumer.run())
    clients = [QueueReferee(url, job_id=f"job-{k}", prefix=prefix, timeout=120) for k in range(jobs)]
    admin = redis_sync.Redis(port=port, decode_responses=True)
    items = [ScoreItem(prompt="What is 2 + 2?", response="4")]

    async def send(n: int) -> None:
        queue = iter(range(n))

        async def worker(k: int) -> None:
            for _ in queue:
                await clients[k % jobs].score(items=items)

        await asyncio.gather(*(worker(k) for k in range(senders)))

    try:
        while consumer.state != "consuming":
            await asyncio.sleep(0.05)
        await send(max(200, messages // 10))  # warm-up: connections, scripts, groups
        admin.config_resetstat()
        SENT.clear()
        cpu0, start = _redis_cpu(admin), time.perf_counter()
        await send(messages)
        elapsed, cpu = time.perf_counter() - start, _redis_cpu(admin) - cpu0
        executed = _commandstats(admin)
        sent = Counter(SENT)
    finally:
        for q in clients:
            await q.aclose()
        await consumer.stop(drain_s=1)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        admin.close()
    return {"elapsed": elapsed, "cpu": cpu, "executed": executed, "sent": sent}


def _redis_benchmark(port: int) -> dict[str, float]:
    if shutil.which("redis-benchmark") is None:
        return {}
    out = subprocess.run(
        ["redis-benchmark", "-p", str(port), "-q", "-n", "200000", "-c", "50", "-t", "set,get"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = {}
    for line in out.replace("\r", "\n").splitlines():
        if m := re.match(r"^(SET|GET): ([\d.]+) requests per second", line.strip()):
            found[m.group(1)] = float(m.group(2))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--senders", type=int, default=32, help="concurrent calls")
    parser.add_argument("--jobs", type=int, default=4, help="job streams the calls are spread over")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    _count_sent()
    port = _free_port()
    with tempfile.TemporaryDirectory() as where:
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=where,
            stdout=subprocess.DEVNULL,
        )
        try:
            probe = redis_sync.Redis(port=port)
            for _ in range(100):
                with contextlib.suppress(redis_sync.ConnectionError):
                    if probe.ping():
                        break
                time.sleep(0.05)
            probe.close()
            got = asyncio.run(_run(port, args.messages, args.senders, args.jobs))
            bench = _redis_benchmark(port)
        finally:
            server.kill()
            server.wait()
    n = args.messages
    sent_total, executed_total = sum(got["sent"].values()), sum(got["executed"].values())
    cpu_per_msg = got["cpu"] / n
    ceiling = 1 / cpu_per_msg if cpu_per_msg > 0 else float("inf")
    version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    lines = [
        f"{n} score messages from {args.senders} concurrent calls over {args.jobs} job streams, one "
        f"consumer (a stand-in judge that answers at once), redis-server {version.removeprefix('v=')} on "
        "loopback without persistence; the clients in one Python process on the same machine "
        f"(`benchmarks/bench_redis_ops.py --messages {n} --senders {args.senders}`).",
        "",
        "| per message | figure |",
        "| --- | --- |",
        f"| commands sent (clients) | {sent_total / n:.1f} |",
        f"| commands executed by Redis (inside scripts included) | {executed_total / n:.1f} |",
        f"| Redis CPU time | {cpu_per_msg * 1e6:.0f} µs |",
        f"| **ceiling of one instance** (one busy core) | **{ceiling:,.0f} messages/s** |",
        f"| reached here (clients on the same 2 cores) | {n / got['elapsed']:,.0f} messages/s |",
    ]
    if bench:
        ops = statistics_mean(bench.values())
        lines.append(
            f"| `redis-benchmark` SET/GET, 50 clients | {ops:,.0f} ops/s: {ops / (sent_total / n):,.0f} "
            "messages/s at the commands sent per message |"
        )
    lines += [
        "",
        "Per message, by command (sent by the clients; executed by Redis, scripts' calls included):",
        "",
    ]
    lines += [
        "| command | sent | executed |",
        "| --- | --- | --- |",
    ]
    names = sorted(set(got["sent"]) | set(got["executed"]), key=lambda c: -got["executed"].get(c, 0))
    for name in names:
        s, e = got["sent"].get(name, 0) / n, got["executed"].get(name, 0) / n
        if s >= 0.005 or e >= 0.005:
            lines.append(f"| {name} | {s:.2f} | {e:.2f} |")
    body = "\n".join(lines) + "\n\n" + READING
    print(body)
    if not args.no_write:
        write_section(
            Path(__file__).resolve().parent.parent / "BENCHMARKS.md", HEADING, INTRO + "\n\n" + body
        )


def statistics_mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


HEADING = "## Redis: commands per queued message and one instance's ceiling"
INTRO = """The estimate in the issue (#26): about six Redis operations per message (send, read, ack,
reply, result, pop), so an instance serving ~100k simple operations per second would carry ~16k
messages/s, about 1,600 accelerators kept busy by 100 ms messages. Measured below: what a message
costs in commands sent, in commands Redis executes (the scripts' own calls included), and in Redis
CPU time, which gives the ceiling more honestly than a count (a script's calls and a stream read
cost more than a GET). Beyond one instance, or for availability before it, the queue runs on Redis
Cluster, each tenant's keys in one slot ([docs/queue.md](docs/queue.md#redis-cluster-and-failover))."""

READING = """Reading: the issue's count of about six operations per message is what the clients send (about
five: the send script, a share of the consumer's read script, the reply script, the acknowledgement
script, the duplicate check (`EXISTS`) and the sender's `BLPOP`; the consumer's housekeeping adds
little at this rate). What Redis executes is about three times that: the send script reads the
tenant's copy of the limits (one `HMGET`; five `HGET`s before key layout 2, 19.7 commands executed per
message then) and the job's caps before its `XADD`, the reply script sets the result marker, pushes
the answer and sets its expiry, the acknowledgement script `XACK`s and `XDEL`s (a `MULTI` pipeline of
four commands before). Counted in Redis' CPU time, one instance carries about half the estimate's
16k messages/s: roughly 8k messages/s of one busy core here (7.5k-8.6k over five runs on this shared
machine), i.e. some 800 accelerators kept busy by 100 ms messages. `redis-benchmark` runs on the same
two cores as everything else here, so its figure swings with the machine's load (17k-57k ops/s).
Beyond that, Redis Cluster: each tenant's keys are in one slot, so tenants spread over the primaries,
but one tenant's traffic stays on one primary; a single tenant past one instance's ceiling needs
several tenants (e.g. one per training job) or larger messages."""


if __name__ == "__main__":
    main()
