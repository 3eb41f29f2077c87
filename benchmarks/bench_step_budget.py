"""The step budget of a shared judge (vLLM's ``max_num_batched_tokens``): throughput against fairness.

One run, one server per budget (the judge's ``engine.extra.max_num_batched_tokens``), the Redis
queue on, every request a ``/pairwise`` logprob verdict (``order=single``) on HH-RLHF harmless dev
rows cut to 600 / 300 / 300 characters, each item with a unique tag (no prefix-cache reuse beyond
the judge's instructions). For each budget:

1. ``throughput``: one backlogged job (``QueueReferee``, a closed loop of ``--inflight`` requests
   of ``--items-per-request`` items): items/s in a ``--seconds`` window after ``--warmup`` s;
2. ``small alone``: a second job asking one ``--probe-items``-item question at a time for
   ``--latency-seconds``: its median latency;
3. ``small beside a flood``: the same small job while a third job (the flood) offers
   ``--flood-factor`` (10) times its fair share (half of phase 1's rate: two jobs of equal weight),
   an open loop whose backlog keeps growing; after ``--warmup`` s the small job asks one question at
   a time for ``--beside-seconds``. Reported: beside / alone (median), and the items/s the engine
   judged in that window (the flood's and the small job's);
4. the flood's backlog is dropped, the server drained and stopped.

Writes ``--output`` (JSON) and prints a markdown table. About 3 minutes per budget on 2 cores.
Must run alone on the machine's cores (under the shared lock in this project):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_step_budget.py --step-budgets 256,512,1024,2048
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tenants import Items, latency_stats, load_items, open_loop, start_server, stop_server  # noqa: E402
from judges_file import describe, pick, read_judges, with_engine  # noqa: E402

EMBEDDED = {
    "name": "smollm2",
    "kind": "generative",
    "model": "embedded:smollm2",
    "engine": {"dtype": "auto", "max_model_len": 2048, "kv_cache_memory_gib": 1.0},
}


async def inflight(client: httpx.AsyncClient) -> float:
    for line in (await client.get("/metrics")).text.splitlines():
        if line.startswith("referee_inflight_engine_requests "):
            return float(line.split()[1])
    return 0.0


async def one_budget(args, url: str, redis_url: str, prefix: str, judge: str) -> dict:
    from referee.client import APIError
    from referee.queue import QueueReferee

    k = args.items_per_request
    items = Items(load_items(), seed=args.seed)  # every budget judges the same items in the same order
    done: list[tuple[float, str, int, float]] = []  # (completion time, job, items, latency)
    errors = {"train": 0, "small": 0, "flood": 0}
    invalid = {"train": 0, "small": 0, "flood": 0}  # items answered with an error (an invalid verdict)

    def body(n: int) -> dict:
        return {"judge": judge, "mode": "logprob", "order": "single", "items": items.take(n)}

    async def ask(ref: QueueReferee, job: str, n: int) -> None:
        t0 = time.monotonic()
        try:
            answer = await ref.pairwise(**body(n))
            ok = len(answer.results) == n  # every item judged (an invalid verdict is an answer too)
            invalid[job] += sum(r.error is not None for r in answer.results)
        except APIError as exc:
            print(f"  {job}: {exc}", file=sys.stderr)
            ok = False
        t1 = time.monotonic()
        if ok:
            done.append((t1, job, n, t1 - t0))
        else:
            errors[job] += 1

    def items_between(t0: float, t1: float, job: str | None = None) -> int:
        return sum(n for t, j, n, _ in done if t0 <= t < t1 and (job is None or j == job))

    async def sequential(ref, seconds: float) -> list[float]:
        start, t_end = len(done), time.monotonic() + seconds
        while time.monotonic() < t_end:
            await ask(ref, "small", args.probe_items)
        return [lat for _, j, _, lat in done[start:] if j == "small"]

    refs = {
        job: QueueReferee(redis_url, job_id=f"{job}-job", prefix=prefix, timeout=900)
        for job in ("train", "small", "flood")
    }
    out: dict = {}
    client = httpx.AsyncClient(base_url=url, timeout=60)
    try:
        for ref in refs.values():  # warm-up: every path, the instructions' prefix cache
            await ask(ref, "small", 1)
        done.clear()

        # 1. one backlogged job: saturated throughput
        stop = asyncio.Event()

        async def worker() -> None:
            while not stop.is_set():
                await ask(refs["train"], "train", k)

        load = [asyncio.create_task(worker()) for _ in range(args.inflight)]
        await asyncio.sleep(args.warmup)
        t0 = time.monotonic()
        await asyncio.sleep(args.seconds)
        t1 = time.monotonic()
        stop.set()
        await asyncio.gather(*load)
        window = [lat for t, j, _, lat in done if t0 <= t < t1 and j == "train"]
        rate = items_between(t0, t1, "train") / (t1 - t0)
        out["throughput"] = {
            "items_per_s": rate,
            "window_s": t1 - t0,
            "request_latency": latency_stats(window),
        }
        print(f"  throughput: {rate:.2f} items/s", flush=True)

        # 2. the small job alone
        lat_alone = await sequential(refs["small"], args.latency_seconds)
        out["small alone"] = latency_stats(lat_alone)
        print(f"  small alone: median {out['small alone']['median_s']:.3f} s", flush=True)

        # 3. the small job beside a flood offering flood_factor x its share (1/2 of the judge)
        offered = args.flood_factor * rate / 2
        tasks: set = set()
        stop = asyncio.Event()

        async def flood_one() -> None:
            await ask(refs["flood"], "flood", k)

        flood = asyncio.create_task(open_loop(offered / k, stop, [flood_one], args.flood_cap, tasks))
        await asyncio.sleep(args.warmup)
        backlog_start = len(tasks)
        t0 = time.monotonic()
        lat_beside = await sequential(refs["small"], args.beside_seconds)
        t1 = time.monotonic()
        out["small beside a flood"] = latency_stats(lat_beside)
        out["small beside a flood"].update(
            flood_offered_items_per_s=offered,
            flood_outstanding_requests_at_start=backlog_start,
            flood_outstanding_requests_at_end=len(tasks),
            items_per_s_in_window=items_between(t0, t1) / (t1 - t0),
            flood_items_per_s_in_window=items_between(t0, t1, "flood") / (t1 - t0),
            small_items_per_s_in_window=items_between(t0, t1, "small") / (t1 - t0),
        )
        out["latency_ratio"] = out["small beside a flood"]["median_s"] / out["small alone"]["median_s"]
        print(
            f"  small beside a flood: median {out['small beside a flood']['median_s']:.3f} s "
            f"({out['latency_ratio']:.2f}x), flood outstanding {len(tasks)}",
            flush=True,
        )
        stop.set()
        out["flood_open_loop"] = await flood
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

        # 4. drop the flood's backlog, let the engine drain
        import redis.asyncio as aredis

        from referee.keys import Keys

        admin = aredis.Redis.from_url(redis_url)
        await admin.xtrim(Keys(prefix, "anonymous").stream("flood-job"), maxlen=0)
        await admin.aclose()
        t_drain = time.monotonic()
        while time.monotonic() - t_drain < 120 and await inflight(client) > 0:
            await asyncio.sleep(1)
        out["drain_s"] = time.monotonic() - t_drain
    finally:
        await client.aclose()
        for ref in refs.values():
            with contextlib.suppress(Exception):
                await ref.aclose()
    out["errors"] = errors
    out["invalid_items"] = invalid
    return out


def table(res: dict) -> str:
    lines = [
        "| step budget (tokens) | one job: items/s | × 2048 | small alone: median / p95 s (n) "
        "| beside the flood: median / p95 s (n) | beside ÷ alone | items/s while flooded "
        "| flood offered items/s |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    runs = res["budgets"]
    base = runs.get("2048", {}).get("throughput", {}).get("items_per_s")
    for budget, r in runs.items():
        if "error" in r:
            lines.append(f"| {budget} | failed: {r['error']} |  |  |  |  |  |  |")
            continue
        a, b = r["small alone"], r["small beside a flood"]
        rate = r["throughput"]["items_per_s"]
        x = f"{rate / base:.2f}" if base else ""
        lines.append(
            f"| {budget} | {rate:.2f} | {x} | {a['median_s']:.3f} / {a['p95_s']:.3f} ({a['n']}) "
            f"| {b['median_s']:.3f} / {b['p95_s']:.3f} ({b['n']}) | **{r['latency_ratio']:.2f}** "
            f"| {b['items_per_s_in_window']:.2f} | {b['flood_offered_items_per_s']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--step-budgets", default="256,512,1024,2048", help="max_num_batched_tokens values")
    parser.add_argument("--seconds", type=float, default=30, help="measured throughput window")
    parser.add_argument("--warmup", type=float, default=8, help="discarded start of the loaded phases")
    parser.add_argument("--latency-seconds", type=float, default=30, help="small job alone")
    parser.add_argument("--beside-seconds", type=float, default=40, help="small job beside the flood")
    parser.add_argument("--inflight", type=int, default=8, help="the backlogged job's requests in flight")
    parser.add_argument("--items-per-request", type=int, default=2)
    parser.add_argument("--probe-items", type=int, default=1, help="items per question of the small job")
    parser.add_argument("--flood-factor", type=float, default=10.0)
    parser.add_argument("--flood-cap", type=int, default=600, help="flood's outstanding requests at most")
    parser.add_argument("--judges", type=Path, help="a judges file (server config format); its first "
                        "generative judge is used, with each step budget set in engine.extra")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("/tmp/bench_step_budget/results.json"))
    args = parser.parse_args()
    budgets = [int(b) for b in args.step_budgets.split(",")]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    judge = EMBEDDED
    if args.judges:
        judge = pick(read_judges(args.judges), "generative")
        if judge is None:
            raise SystemExit(f"{args.judges} has no generative judge")
    started = time.monotonic()
    runs: dict = {}
    for budget in budgets:
        prefix = f"referee-bench-steps-{uuid.uuid4().hex[:6]}"
        config = {
            "judges": [with_engine(judge, extra={"max_num_batched_tokens": budget})],
            "queue": {
                "enabled": True,
                "url": redis_url,
                "prefix": prefix,
                "block_ms": 50,
                "shutdown_grace_s": 1.0,
            },
        }
        path = args.output.parent / f"judges-{budget}.yaml"
        path.write_text(yaml.safe_dump(config))
        print(f"step budget {budget}: starting the server", flush=True)
        proc = None
        try:
            proc, url = start_server(path, args.output.parent / f"server-{budget}.log")
            runs[str(budget)] = asyncio.run(one_budget(args, url, redis_url, prefix, judge["name"]))
        except Exception as exc:  # one budget failing does not lose the others
            print(f"  step budget {budget} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            runs[str(budget)] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            if proc is not None:
                stop_server(proc)
            import redis

            admin = redis.Redis.from_url(redis_url)
            stale = list(admin.scan_iter(f"{prefix}:*", count=1000))
            if stale:
                admin.delete(*stale)
            admin.close()
    import vllm

    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    result = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "command": " ".join(
            ["HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_step_budget.py", *sys.argv[1:]]
        ),
        "machine": f"{os.cpu_count()} cores, vllm {vllm.__version__}",
        "judge": describe(judge),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "wall_s": time.monotonic() - started,
        "budgets": runs,
    }
    args.output.write_text(json.dumps(result, indent=2))
    print()
    print(table(result))
    print(f"\nresults: {args.output} ({result['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
