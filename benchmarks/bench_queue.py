"""Judge latency through Redis versus HTTP, and fairness between two jobs sharing the judge.

Starts ``referee serve --queue`` with the embedded judge (small engine steps, as the fairness
section of the README describes), then, in one run:

1. the same win-rate questions (groups of 4, both orders: 12 one-token verdicts each) asked one
   at a time over HTTP and through the queue: median and p95 latency of each path;
2. a small job asking one question at a time, alone and then beside a job that sends ten times
   its traffic at once: the small job's median latency in both cases.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_queue.py

``--judges FILE`` (a judges file in the server's config format) runs the same questions against the
file's first generative judge instead of the embedded one, with the file's engine settings
(``--step-tokens``, when given, still sets its ``max_num_batched_tokens``); the results go to a
section of their own, named after the file.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

from referee.client import AsyncReferee
from referee.queue import QueueReferee

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_hh import _free_port, _ready, write_section
from judges_file import describe, pick, read_judges, with_engine

REPO = Path(__file__).resolve().parent.parent
HEADING = "## Queue: judge latency through Redis versus HTTP, and fairness between jobs"
QUESTION = "Write a haiku about autumn rain."
DRAFTS = [
    "Leaves fall softly down",
    "Rain taps on the roof",
    "Grey clouds, wet streets shine",
    "Autumn is a season",
]

counter = iter(range(1_000_000))


def request(order: str = "both") -> dict:
    k = next(counter)  # distinct groups, as in training: only the question's prefix is cached
    return {
        "prompt": QUESTION,
        "responses": [f"{d} (draft {k}.{i})" for i, d in enumerate(DRAFTS)],
        "order": order,
    }


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def sequential(call, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.monotonic()
        await call(**request())
        out.append(time.monotonic() - t)
    return out


async def measure(url: str, redis_url: str, prefix: str, n: int) -> dict:
    results = {}
    async with (
        AsyncReferee(url) as http,
        QueueReferee(redis_url, job_id="bench-http-vs-queue", prefix=prefix, timeout=600) as queue,
    ):
        await http.winrate(**request())
        await queue.winrate(**request())
        results["http"] = await sequential(http.winrate, n)
        results["queue"] = await sequential(queue.winrate, n)
    async with (
        QueueReferee(redis_url, job_id="bench-small", prefix=prefix, timeout=600) as small,
        QueueReferee(redis_url, job_id="bench-big", prefix=prefix, timeout=600) as big,
    ):
        results["small alone"] = await sequential(small.winrate, n)

        async def flood() -> None:
            await asyncio.gather(*[big.winrate(**request()) for _ in range(10 * n)])

        flooding = asyncio.create_task(flood())
        await asyncio.sleep(1.0)
        t = time.monotonic()
        results["small beside a 10x job"] = await sequential(small.winrate, n)
        results["_flood_still_running"] = [float(not flooding.done())]
        await flooding
        results["_flood_s"] = [time.monotonic() - t]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=8, help="questions per measurement")
    parser.add_argument("--step-tokens", type=int, default=None,
                        help="vLLM max_num_batched_tokens (default: 256 for the embedded judge, the "
                        "file's setting with --judges)")  # fmt: skip
    parser.add_argument("--judges", type=Path, help="a judges file (server config format); its first "
                        "generative judge replaces the embedded one")  # fmt: skip
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args()
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = f"referee-bench-{uuid.uuid4().hex[:6]}"
    judge = {
        "name": "smollm2",
        "kind": "generative",
        "model": "embedded:smollm2",
        "engine": {
            "dtype": "auto",  # the CPU rule: bf16 where native, float32 elsewhere
            "max_model_len": 2048,
            "kv_cache_memory_gib": 1.0,
        },
    }
    if args.judges:
        judge = pick(read_judges(args.judges), "generative")
        if judge is None:
            raise SystemExit(f"{args.judges} has no generative judge")
    elif args.step_tokens is None:
        args.step_tokens = 256
    if args.step_tokens is not None:
        judge = with_engine(judge, extra={"max_num_batched_tokens": args.step_tokens})
    step = judge.get("engine", {}).get("extra", {}).get("max_num_batched_tokens", "vLLM's default")
    config = {
        "judges": [judge],
        "queue": {"enabled": True, "url": redis_url, "prefix": prefix, "block_ms": 50},
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "judges.yaml"
        path.write_text(yaml.safe_dump(config))
        port = _free_port()
        env = {"HF_HUB_OFFLINE": "1", **os.environ}  # HF_HUB_OFFLINE=0: --judges may download
        env.pop("REFEREE_CONFIG", None)
        log = open(Path(tmp) / "server.log", "w")  # noqa: SIM115
        server = subprocess.Popen(
            [sys.executable, "-m", "referee.cli", "serve", "--config", str(path), "--port", str(port)],
            stdout=log,
            stderr=log,
            env=env,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            while not _ready(url):
                if server.poll() is not None:
                    raise SystemExit((Path(tmp) / "server.log").read_text()[-3000:])
                time.sleep(1)
            results = asyncio.run(measure(url, redis_url, prefix, args.n))
        finally:
            server.terminate()
            server.wait(timeout=60)
            import redis

            r = redis.Redis.from_url(redis_url)
            keys = list(r.scan_iter(f"{prefix}:*"))
            if keys:
                r.delete(*keys)

    rows = ["| measurement | questions | median s | p95 s |", "| --- | --- | --- | --- |"]
    for name, values in results.items():
        if not name.startswith("_"):
            rows.append(
                f"| {name} | {len(values)} | {statistics.median(values):.3f} | {pct(values, 0.95):.3f} |"
            )
    med = {k: statistics.median(v) for k, v in results.items() if not k.startswith("_")}
    command = " ".join(["HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_queue.py", *sys.argv[1:]])
    who = describe(judge) if args.judges else "the embedded SmolLM2-135M-Instruct"
    body = f"""
Command: `{command}`
({dt.date.today()}, {os.cpu_count()} CPU cores, Redis 7 on localhost). Judge: {who},
`max_num_batched_tokens: {step}`. Each question: `/winrate` over a
group of 4 distinct responses, `order=both` (12 one-token verdicts), asked one at a time by one client.

{chr(10).join(rows)}

- Through Redis versus HTTP: {med["queue"] / med["http"]:.2f}x the HTTP median latency (the queue adds an
  XADD, a consumer read and a reply pop around the same judging).
- Fairness: beside a job sending ten times its traffic at once, the small job's median latency was
  {med["small beside a 10x job"] / med["small alone"]:.2f}x its latency alone (flood still running at
  the end of the small job's run: {bool(results["_flood_still_running"][0])}).
"""
    heading = HEADING if args.step_tokens == 256 else f"{HEADING} (max_num_batched_tokens {step})"
    if args.judges:
        heading = f"{HEADING} (judges file {args.judges.name})"
    write_section(args.output, heading, body)
    print(body)


if __name__ == "__main__":
    main()
