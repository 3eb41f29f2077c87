"""The full training stack on one machine, without Docker.

Redis (the running one, or started here), the reward server with the embedded judge consuming the
queue, one /pairwise and one /winrate question over HTTP, then two GRPO trainer jobs that get their
win-rate rewards from the shared judge through Redis. Shows the jobs' progress live, then where
their metrics and plots are, and the stack's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.live import Live
from rich.table import Table

from referee import PairwiseItem, Referee
from referee.health import HealthReport, format_report

REPO = Path(__file__).resolve().parent.parent
console = Console()
QUESTION = "What is the capital of France?"
GROUP = ["The capital of France is Paris.", "I like turtles.", "Paris.", "London is the capital of France."]


def ensure_redis(url: str) -> None:
    import redis

    try:
        redis.Redis.from_url(url).ping()
        console.print(f"redis: answering at {url}")
        return
    except redis.ConnectionError:
        pass
    if not shutil.which("redis-server"):
        raise SystemExit(
            "Redis is not running and redis-server is not installed (apt-get install redis-server)"
        )
    subprocess.run(
        [
            "redis-server",
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        check=True,
    )
    for _ in range(50):
        try:
            redis.Redis.from_url(url).ping()
            console.print("redis: started on 127.0.0.1:6379")
            return
        except redis.ConnectionError:
            time.sleep(0.1)
    raise SystemExit("redis-server did not start")


class PeakMemory(threading.Thread):
    """Peak of the summed resident memory of some process trees."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.roots: list[int] = []
        self.peak = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            total = 0
            for pid in list(self.roots):
                try:
                    root = psutil.Process(pid)
                    total += sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.5)


def ask_over_http(url: str) -> None:
    with Referee(url) as ref:
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
            table.add_row(
                str(item.prompt),
                item.response_a,
                item.response_b,
                "-" if r.p_a is None else f"{r.p_a:.3f}",
                r.verdict,
                str(r.consistent),
            )
        console.print(table)
        t = time.monotonic()
        wr = ref.winrate(prompt=QUESTION, responses=GROUP, order="both")
        table = Table(
            "response",
            "win rate",
            "advantage",
            title=(
                f"POST /winrate ({wr.comparisons} comparisons, {wr.usage.engine_requests} engine requests, "
                f"{time.monotonic() - t:.2f}s, ties {wr.ties}, invalid {wr.invalid})"
            ),
        )
        for text, rate, adv in zip(GROUP, wr.win_rates, wr.advantages, strict=True):
            table.add_row(text, "-" if rate is None else f"{rate:.3f}", "-" if adv is None else f"{adv:+.2f}")
        console.print(table)


def _last_row(path: Path) -> dict | None:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    return json.loads(lines[-1]) if lines else None


def _fmt(row: dict, key: str, spec: str = "{:.3f}") -> str:
    return "-" if row.get(key) is None else spec.format(row[key])


def _jobs_table(jobs: dict[str, subprocess.Popen], runs: Path, steps: int, started: float) -> Table:
    table = Table(
        "job",
        "step",
        "judge rating (1-9)",
        "win-rate spread",
        "judge latency",
        "ties",
        "invalid",
        "order flips",
        "state",
        title=f"GRPO jobs sharing one judge ({time.monotonic() - started:.0f}s)",
    )
    for job, proc in jobs.items():
        row = _last_row(runs / job / "metrics.jsonl") or {}
        state = (
            "running"
            if proc.poll() is None
            else ("done" if proc.returncode == 0 else f"failed ({proc.returncode})")
        )
        table.add_row(
            job,
            f"{row.get('step', 0)}/{steps}",
            _fmt(row, "rewards/score_1/mean", "{:.2f}"),
            _fmt(row, "judge/winrate_spread"),
            _fmt(row, "judge/latency_s", "{:.2f}s"),
            _fmt(row, "judge/ties", "{:.0f}"),
            _fmt(row, "judge/invalid", "{:.0f}"),
            _fmt(row, "judge/health/order_flip_rate", "{:.2f}"),
            state,
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=int(os.environ.get("REFEREE_PORT", 8000)))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "train-demo.yaml")
    parser.add_argument("--runs", type=Path, default=REPO / "runs")
    parser.add_argument(
        "--judges",
        type=Path,
        default=None,
        help="The server's config (judges) instead of the embedded judge, e.g. "
        "configs/judges.gpu.example.yaml on a GPU; hub models may then be downloaded.",
    )
    args = parser.parse_args()

    redis_url = os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/0")
    if args.judges is None:
        os.environ["HF_HUB_OFFLINE"] = "1"  # the embedded models only
    # The demo stack runs open on loopback: keys or tenants exported for another server would
    # make its server require keys its trainers do not have.
    for name in ("REFEREE_API_KEY", "REFEREE_TENANTS_FILE", "REFEREE_TENANTS"):
        os.environ.pop(name, None)
    ensure_redis(redis_url)
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", args.port)) == 0:
            raise SystemExit(f"port {args.port} is taken; set REFEREE_PORT to another")
    args.runs.mkdir(parents=True, exist_ok=True)
    memory = PeakMemory()
    memory.start()
    started = time.monotonic()
    server_log = args.runs / "server.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "referee.cli", "serve", "--queue", "--port", str(args.port)]
        + (["--config", str(args.judges)] if args.judges else []),
        stdout=server_log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    memory.roots.append(server.pid)
    url = f"http://127.0.0.1:{args.port}"
    jobs: dict[str, subprocess.Popen] = {}
    try:
        with (
            Referee(url) as ref,
            console.status(f"starting the reward server (embedded judge); log: {server_log}"),
        ):
            while not ref.health():
                if server.poll() is not None:
                    raise SystemExit(f"the server exited; see {server_log}")
                time.sleep(1)
        console.print(f"reward server ready at {url} after {time.monotonic() - started:.0f}s")
        ask_over_http(url)

        import yaml

        steps = yaml.safe_load(args.config.read_text()).get("max_steps", 4)
        for k in range(args.jobs):
            job = f"job-{chr(ord('a') + k)}"
            log = (args.runs / f"{job}.log").open("w")
            jobs[job] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "trainer.cli",
                    "--job-id",
                    job,
                    "--config",
                    str(args.config),
                    "--output-dir",
                    str(args.runs),
                    "--seed",
                    str(k),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            memory.roots.append(jobs[job].pid)
        console.print(
            f"started {args.jobs} GRPO jobs (policy: embedded SmolLM2-135M-Instruct, rewards: win rates "
            f"through Redis); logs in {args.runs}/job-*.log"
        )
        t0 = time.monotonic()
        with Live(_jobs_table(jobs, args.runs, steps, t0), console=console, refresh_per_second=1) as live:
            while any(p.poll() is None for p in jobs.values()):
                time.sleep(1)
                live.update(_jobs_table(jobs, args.runs, steps, t0))
            live.update(_jobs_table(jobs, args.runs, steps, t0))
        console.print()
    finally:
        for proc in jobs.values():
            if proc.poll() is None:
                proc.terminate()
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
        memory.stopped.set()

    failed = [job for job, p in jobs.items() if p.returncode != 0]
    warned = False
    for job in jobs:
        path = args.runs / job / "judge_report.json"
        if path.exists():  # what the judge gave the job, and whether it carried signal
            report = HealthReport.model_validate_json(path.read_text())
            console.print(format_report(report), markup=False, highlight=False, soft_wrap=True)
            warned = warned or bool(report.warnings)
    if warned and args.judges is None:
        console.print(
            "The embedded 135M judge is there to run the stack on a laptop, not to judge: it picks a "
            "position, not a response, so its win rates are ties and the jobs learn nothing from it. "
            "For a reward with signal, the same demo with real judges on a GPU: "
            "`make demo JUDGES=configs/judges.gpu.example.yaml` (docs/deployment.md).",
            highlight=False,
        )
    for job in jobs:
        out = args.runs / job
        summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
        console.print(
            f"{job}: {summary.get('steps', 0)} steps, {summary.get('steps_per_minute')} steps/min, "
            f"mean judge latency {summary.get('mean_judge_latency_s')}s, "
            f"{summary.get('duplicate_completions')} of {summary.get('completions')} completions "
            f"repeated inside their group; metrics {out / 'metrics.jsonl'}, plot {out / 'reward_curve.png'}, "
            f"completions {out / 'completions.jsonl'}"
        )
    console.print(
        f"whole stack: {time.monotonic() - started:.0f}s, peak resident memory "
        f"{memory.peak / 2**30:.2f} GiB (server, engines and trainers, summed)"
    )
    if failed:
        raise SystemExit(f"jobs failed: {failed}; see their logs in {args.runs}")


if __name__ == "__main__":
    main()
