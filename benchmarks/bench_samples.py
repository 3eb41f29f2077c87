"""Verdicts by majority of sampled judgments: cost and agreement with human labels.

Starts ``referee serve`` with the embedded judge (the judgment cache off), then judges the same
HH-RLHF harmless dev pairs (never printed) with ``mode=cot`` and ``samples`` 1, 3 and 5: agreement
with the human label (ties half right; invalid pairs apart), the invalid share, engine requests and
seconds per pair, in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_samples.py [--pairs 32 --max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import yaml

from referee.client import AsyncReferee
from referee.evaluation import evaluate, load_pairs

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_throughput import start_server, stop_server  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "hh_harmless_dev.jsonl"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--samples", default="1,3,5")
    p.add_argument("--order", default="single")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--port", type=int, default=18471)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/referee-bench-samples"))
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "judges": [
            {
                "name": "smollm2",
                "kind": "generative",
                "model": "embedded:smollm2",
                "engine": {"dtype": "auto", "max_model_len": 2048, "kv_cache_memory_gib": 1.0},
            }
        ],
        "cache": {"enabled": False},
        "limits": {"max_inflight_engine_requests": 100_000},
    }
    path = args.workdir / "referee.yaml"
    path.write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{args.port}"
    cmd = [sys.executable, "-m", "referee.cli", "serve", "--config", str(path), "--port", str(args.port)]
    proc = start_server(cmd, args.workdir / "referee.log", url + "/readyz")
    pairs = load_pairs(DATA, args.pairs)
    rows = []
    try:
        for k in (int(x) for x in args.samples.split(",")):

            async def run(k=k):
                async with AsyncReferee(url) as client:
                    return await evaluate(
                        client,
                        pairs,
                        mode="cot",
                        order=args.order,
                        batch_size=4,
                        concurrency=4,
                        max_new_tokens=args.max_new_tokens,
                        samples=k,
                    )

            r = asyncio.run(run())
            rows.append((k, r))
            print(
                f"samples {k}: accuracy {r.accuracy}, invalid {r.invalid}/{r.pairs}, ties {r.ties}, "
                f"engine requests/pair {r.engine_requests / r.pairs:.1f}, s/pair {r.seconds / r.pairs:.2f}",
                flush=True,
            )
    finally:
        stop_server(proc)
    base = rows[0][1]
    print("| samples | agreement (valid pairs) | invalid | ties | engine requests / pair | s / pair | cost |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for k, r in rows:
        acc = "-" if r.accuracy is None else f"{r.accuracy:.3f}"
        print(
            f"| {k} | {acc} | {r.invalid}/{r.pairs} | {r.ties} | {r.engine_requests / r.pairs:.1f} | "
            f"{r.seconds / r.pairs:.2f} | {r.seconds / base.seconds:.2f}x |"
        )


if __name__ == "__main__":
    main()
