"""What judge-health telemetry costs /winrate: two referee servers, the same embedded judge, one with
``health.enabled`` and one without, asked the same kind of /winrate groups in alternating rounds
(on, off, on, off, ...) so that drift in this machine's speed falls on both; the judgment cache off
on both, every group distinct (HH-RLHF harmless dev rows, never printed). Also times the tally of one
answer and the report of a job, in process.

Usage: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_health.py [--rounds 6 --groups 16]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_throughput import start_server, stop_server  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "hh_harmless_dev.jsonl"


def groups(n: int, size: int, max_chars: int) -> list[dict]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    out = []
    for k in range(n):
        row = rows[k % len(rows)]
        other = rows[(k + 1) % len(rows)]
        responses = [row["chosen"], row["rejected"], other["chosen"], other["rejected"]][:size]
        out.append(
            {
                "prompt": row["prompt"][-max_chars:] + f" ({k})",  # distinct even when rows repeat
                "responses": [r[:max_chars] for r in responses],
                "order": "both",
            }
        )
    return out


async def round_of(url: str, batch: list[dict], concurrency: int, job: str) -> tuple[float, float]:
    """Groups per second and median latency of one round."""
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=600, headers={"X-Referee-Job": job}) as http:

        async def one(body):
            async with sem:
                t = time.perf_counter()
                r = await http.post("/winrate", json=body)
                r.raise_for_status()
                latencies.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*[one(b) for b in batch])
        return len(batch) / (time.perf_counter() - t0), statistics.median(latencies)


def in_process_costs() -> dict[str, float]:
    """Microseconds to tally one /winrate answer (8 responses, 28 pairs) and to report a job of
    1,000 such answers over 24 windows."""
    sys.path[:0] = [str(REPO / "clients")]
    from referee.health import Tally, build_report, tally_answer
    from referee.protocol import Usage, WinRateRequest, WinRateResponse

    n = 8
    req = WinRateRequest(prompt="Q", responses=[f"response {'x' * k}" for k in range(n)], order="both")
    matrix = [[None if i == j else (1.0 if i > j else 0.0) for j in range(n)] for i in range(n)]
    resp = WinRateResponse(
        judge="j",
        win_rates=[i / (n - 1) for i in range(n)],
        advantages=[0.0] * n,
        win_matrix=matrix,
        comparisons=28,
        ties=3,
        invalid=1,
        inconsistent=3,
        inconsistent_rule="tie",
        usage=Usage(),
    )
    reps = 2000
    t = time.perf_counter()
    for _ in range(reps):
        tally = tally_answer(req, resp)
    tally_us = (time.perf_counter() - t) / reps * 1e6
    windows = {300 * w: {"j/winrate": Tally({k: v * 1000 / 24 for k, v in tally.items()})} for w in range(24)}
    t = time.perf_counter()
    for _ in range(50):
        build_report(windows, tenant="t", job="j", window_s=300)
    report_us = (time.perf_counter() - t) / 50 * 1e6
    return {"tally_us": round(tally_us, 1), "report_us": round(report_us, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6, help="rounds per server, alternating")
    p.add_argument("--groups", type=int, default=16, help="/winrate groups per round")
    p.add_argument("--size", type=int, default=4, help="responses per group")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-chars", type=int, default=600)
    p.add_argument("--port", type=int, default=18461)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/referee-bench-health"))
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print("in process:", in_process_costs(), flush=True)

    procs, urls = {}, {}
    try:
        for k, state in enumerate(("on", "off")):
            config = {
                "judges": [
                    {
                        "name": "smollm2",
                        "kind": "generative",
                        "model": "embedded:smollm2",
                        "engine": {"dtype": "auto", "max_model_len": 2048, "kv_cache_memory_gib": 0.5},
                    }
                ],
                "cache": {"enabled": False},
                "health": {"enabled": state == "on"},
                "limits": {"max_inflight_engine_requests": 100_000},
            }
            path = args.workdir / f"health-{state}.yaml"
            path.write_text(yaml.safe_dump(config))
            port = args.port + k
            urls[state] = f"http://127.0.0.1:{port}"
            cmd = [sys.executable, "-m", "referee.cli", "serve", "--config", str(path), "--port", str(port)]
            print(f"server with health {state}: starting", flush=True)
            procs[state] = start_server(cmd, args.workdir / f"health-{state}.log", urls[state] + "/readyz")
        data = groups(2 * (args.rounds + 1) * args.groups, args.size, args.max_chars)
        chunks = iter([data[i : i + args.groups] for i in range(0, len(data), args.groups)])
        for state in ("on", "off"):  # warm-up
            asyncio.run(round_of(urls[state], next(chunks), args.concurrency, "warmup"))
        results: dict[str, list[tuple[float, float]]] = {"on": [], "off": []}
        for r in range(args.rounds):
            for state in ("on", "off") if r % 2 == 0 else ("off", "on"):
                rate, p50 = asyncio.run(round_of(urls[state], next(chunks), args.concurrency, "bench"))
                results[state].append((rate, p50))
                print(f"round {r} health {state}: {rate:.2f} groups/s, p50 {p50:.2f}s", flush=True)
        report = httpx.get(urls["on"] + "/report", params={"job": "bench"}, timeout=30).json()
        print("report of the measured job:", report["warnings"], flush=True)
    finally:
        for proc in procs.values():
            stop_server(proc)
    on = statistics.median(x for x, _ in results["on"])
    off = statistics.median(x for x, _ in results["off"])
    ratios = [a / b for (a, _), (b, _) in zip(results["on"], results["off"], strict=True)]
    print(
        f"median groups/s: health on {on:.3f}, off {off:.3f}, on/off {on / off:.3f}; per-round on/off "
        f"ratios {min(ratios):.3f}..{max(ratios):.3f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
