"""Ask a running referee server a /pairwise and a /winrate question and print the answers."""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.table import Table

from referee import PairwiseItem, Referee

console = Console()

QUESTION = "What is the capital of France?"
GROUP = [
    "The capital of France is Paris.",
    "I like turtles.",
    "Paris.",
    "London is the capital of France.",
]


def wait_ready(ref: Referee, timeout: float = 600) -> None:
    start = time.monotonic()
    with console.status("waiting for the judges to load (about a minute on 2 CPU cores)..."):
        while not ref.health():
            if time.monotonic() - start > timeout:
                raise SystemExit(f"the server was not ready after {timeout:.0f}s; see its log")
            time.sleep(1)
    console.print(f"server ready after {time.monotonic() - start:.0f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    args = parser.parse_args()
    with Referee(args.url) as ref:
        wait_ready(ref)
        judges = ref.judges()
        console.print(f"judges: {', '.join(f'{j.name} ({j.kind}, {j.model})' for j in judges.judges)}")

        items = [
            PairwiseItem(prompt=QUESTION, response_a=GROUP[0], response_b=GROUP[1]),
            PairwiseItem(prompt="What is 12 * 12?", response_a="144", response_b="124"),
        ]
        t = time.monotonic()
        pair = ref.pairwise(items=items, mode="logprob", order="both")
        table = Table(
            "prompt",
            "A",
            "B",
            "P(A better)",
            "verdict",
            "orders agree",
            title=f"POST /pairwise ({time.monotonic() - t:.2f}s)",
        )
        for item, r in zip(items, pair.results, strict=True):
            p = "-" if r.p_a is None else f"{r.p_a:.3f}"
            table.add_row(str(item.prompt), item.response_a, item.response_b, p, r.verdict, str(r.consistent))
        console.print(table)

        t = time.monotonic()
        wr = ref.winrate(prompt=QUESTION, responses=GROUP, order="both")
        table = Table(
            "response",
            "win rate",
            "advantage",
            title=f"POST /winrate: {QUESTION!r} ({wr.comparisons} comparisons, "
            f"{wr.usage.engine_requests} engine requests, {time.monotonic() - t:.2f}s)",
        )
        for text, rate, adv in zip(GROUP, wr.win_rates, wr.advantages, strict=True):
            table.add_row(text, "-" if rate is None else f"{rate:.3f}", "-" if adv is None else f"{adv:+.2f}")
        console.print(table)
        console.print(f"ties: {wr.ties}, invalid: {wr.invalid}")
        console.print(
            "The embedded 135M judge is there so that everything runs offline; point the server at "
            "a real reward model or judge for real rewards (see README)."
        )


if __name__ == "__main__":
    main()
