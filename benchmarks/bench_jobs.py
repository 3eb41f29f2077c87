"""Many training jobs sharing one judge through Redis: total throughput and each job's share.

One server (``referee serve`` with the queue consumer, its defaults), one tenant (the open one),
the same workload for every job: ``/pairwise`` logprob verdicts (``order=single``) on HH-RLHF
harmless dev rows cut to 600 / 300 / 300 characters, ``--items-per-request`` items per request,
each item with a unique tag. Every job is a ``QueueReferee`` closed loop keeping ``--inflight``
requests in flight (a training job waiting on its rewards). Phases, in one run:

1. ``one job alone``: items/s in a ``--seconds`` window after ``--warmup`` s;
2. ``--jobs`` (4) jobs at once: total items/s against phase 1, and each job's share of the items
   judged in the window (target: within ±10 % of 1/jobs), also by thirds of the window;
3. ``one job alone again``: drift in the machine's speed, told apart from the cost of sharing.

CPU use (cores) of the API process, the engine processes, this script, redis-server and everything
else is recorded per phase. Writes ``--output`` (JSON) and prints a markdown table; about 5 minutes.
Must run alone on the machine's cores (under the shared lock in this project):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_jobs.py --jobs 4 --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tenants import CpuMeter, Items, load_items, start_server, stop_server  # noqa: E402
from judges_file import describe, pick, read_judges, with_engine  # noqa: E402

EMBEDDED = {
    "name": "smollm2",
    "kind": "generative",
    "model": "embedded:smollm2",
    "engine": {"dtype": "auto", "max_model_len": 2048, "kv_cache_memory_gib": 1.0},
}


async def run(args, redis_url: str, prefix: str, judge: str, pid: int) -> dict:
    from referee.client import APIError
    from referee.queue import QueueReferee

    cpu = CpuMeter(pid)
    items = Items(load_items(), seed=args.seed)
    k = args.items_per_request
    done: list[tuple[float, str, int, int]] = []  # (completion, job, items, prompt tokens)
    errors: dict[str, int] = {}
    invalid = {"items": 0}  # items answered with an error (e.g. an invalid verdict): judged all the same
    refs: dict[str, QueueReferee] = {}

    def ref(job: str) -> QueueReferee:
        if job not in refs:
            refs[job] = QueueReferee(redis_url, job_id=job, prefix=prefix, timeout=900)
        return refs[job]

    async def ask(job: str) -> None:
        body = {"judge": judge, "mode": "logprob", "order": "single", "items": items.take(k)}
        try:
            answer = await ref(job).pairwise(**body)
            ok = len(answer.results) == k  # every item judged (an invalid verdict is an answer too)
            invalid["items"] += sum(r.error is not None for r in answer.results)
        except APIError as exc:
            print(f"  {job}: {exc}", file=sys.stderr)
            ok = False
        if ok:
            done.append((time.monotonic(), job, k, answer.usage.prompt_tokens))
        else:
            errors[job] = errors.get(job, 0) + 1

    async def phase(name: str, jobs: list[str]) -> dict:
        stop = asyncio.Event()

        async def worker(job: str) -> None:
            while not stop.is_set():
                await ask(job)

        load = [asyncio.create_task(worker(j)) for j in jobs for _ in range(args.inflight)]
        await asyncio.sleep(args.warmup)
        t0, c0 = time.monotonic(), cpu.snapshot()
        await asyncio.sleep(args.seconds)
        t1, c1 = time.monotonic(), cpu.snapshot()
        stop.set()
        await asyncio.gather(*load)
        span = t1 - t0
        per = {j: sum(n for t, jj, n, _ in done if t0 <= t < t1 and jj == j) for j in jobs}
        tokens = sum(tok for t, _, _, tok in done if t0 <= t < t1)
        total = sum(per.values())
        thirds = []
        for i in range(3):
            a, b = t0 + i * span / 3, t0 + (i + 1) * span / 3
            part = {j: sum(n for t, jj, n, _ in done if a <= t < b and jj == j) for j in jobs}
            thirds.append({j: v / (sum(part.values()) or 1) for j, v in part.items()})
        out = {
            "jobs": jobs,
            "window_s": span,
            "items": per,
            "items_per_s": total / span,
            "prompt_tokens_per_s": tokens / span,
            "share": {j: v / (total or 1) for j, v in per.items()},
            "share_by_third": thirds,
            "cores": CpuMeter.cores(c0, c1),
        }
        print(f"{name}: {out['items_per_s']:.2f} items/s, shares "
              + ", ".join(f"{j} {s:.1%}" for j, s in out["share"].items()), flush=True)  # fmt: skip
        return out

    phases: dict = {}
    try:
        await ask("warmup")
        phases["one job alone"] = await phase("one job alone", ["solo"])
        phases[f"{args.jobs} jobs"] = await phase(f"{args.jobs} jobs", [f"job-{i}" for i in range(args.jobs)])
        phases["one job alone again"] = await phase("one job alone again", ["solo"])
    finally:
        for r in refs.values():
            with contextlib.suppress(Exception):
                await r.aclose()
    many = phases[f"{args.jobs} jobs"]
    alone = [phases["one job alone"]["items_per_s"], phases["one job alone again"]["items_per_s"]]
    many["vs_alone"] = many["items_per_s"] / alone[0]
    many["vs_alone_mean"] = many["items_per_s"] / statistics.fmean(alone)
    many["share_over_fair"] = {j: s * args.jobs for j, s in many["share"].items()}
    phases["errors"] = errors
    phases["invalid_items"] = invalid["items"]
    return phases


def table(res: dict) -> str:
    p = res["phases"]
    n = res["args"]["jobs"]
    many = p[f"{n} jobs"]
    lines = [
        f"| job | items judged | share | share ÷ fair (1/{n}) |",
        "|---|--:|--:|--:|",
    ]
    for j in many["jobs"]:
        lines.append(
            f"| {j} | {many['items'][j]} | {many['share'][j]:.1%} | **{many['share_over_fair'][j]:.2f}** |"
        )
    thirds = " ; ".join("/".join(f"{t[j]:.1%}" for j in many["jobs"]) for t in many["share_by_third"])
    lines += [
        "",
        "| measurement | value |",
        "|---|--:|",
        f"| one job alone: items/s (prompt tokens/s) | {p['one job alone']['items_per_s']:.2f} "
        f"({p['one job alone']['prompt_tokens_per_s']:.0f}) |",
        f"| {n} jobs at once: items/s (prompt tokens/s) | {many['items_per_s']:.2f} "
        f"({many['prompt_tokens_per_s']:.0f}) |",
        f"| one job alone again: items/s | {p['one job alone again']['items_per_s']:.2f} |",
        f"| {n} jobs ÷ one job alone | **{many['vs_alone']:.2f}** |",
        f"| {n} jobs ÷ mean of the two alone phases | {many['vs_alone_mean']:.2f} |",
        f"| shares by third of the window | {thirds} |",
        "",
        "| phase (cores busy) | API | engine | benchmark clients | redis | other processes | machine |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for name in ("one job alone", f"{n} jobs", "one job alone again"):
        c = p[name]["cores"]
        cells = " | ".join(f"{c[x]:.2f}" for x in ("api", "engine", "bench", "redis", "others", "machine"))
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60, help="measured window of each phase")
    parser.add_argument("--warmup", type=float, default=10, help="discarded start of each phase")
    parser.add_argument("--inflight", type=int, default=8, help="requests in flight per job")
    parser.add_argument("--items-per-request", type=int, default=2)
    parser.add_argument("--step-tokens", type=int, default=None,
                        help="the judge's max_num_batched_tokens (default: its own)")  # fmt: skip
    parser.add_argument("--judges", type=Path, help="a judges file (server config format); its first "
                        "generative judge is used")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("/tmp/bench_jobs/results.json"))
    args = parser.parse_args()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = f"referee-bench-jobs-{uuid.uuid4().hex[:6]}"
    judge = EMBEDDED
    if args.judges:
        judge = pick(read_judges(args.judges), "generative")
        if judge is None:
            raise SystemExit(f"{args.judges} has no generative judge")
    if args.step_tokens:
        judge = with_engine(judge, extra={"max_num_batched_tokens": args.step_tokens})
    config = {
        "judges": [judge],
        "queue": {
            "enabled": True,
            "url": redis_url,
            "prefix": prefix,
            "block_ms": 50,
            "shutdown_grace_s": 1.0,
        },
    }
    path = args.output.parent / "judges.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.monotonic()
    proc = None
    try:
        proc, url = start_server(path, args.output.parent / "server.log")
        print(f"server ready in {time.monotonic() - started:.0f} s at {url}", flush=True)
        phases = asyncio.run(run(args, redis_url, prefix, judge["name"], proc.pid))
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
        "command": "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_jobs.py " + " ".join(sys.argv[1:]),
        "machine": f"{os.cpu_count()} cores, vllm {vllm.__version__}",
        "judge": describe(judge),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "wall_s": time.monotonic() - started,
        "phases": phases,
    }
    args.output.write_text(json.dumps(result, indent=2))
    print()
    print(table(result))
    print(f"\nerrors: {phases['errors']}; results: {args.output} ({result['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
