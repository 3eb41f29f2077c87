"""The API process's worst event-loop stall while it handles the largest legal requests.

Starts ``referee serve`` with the embedded judge (its default settings: ``max_model_len`` 4096) and
the default ``limits``; a probe in a separate process sends ``GET /healthz`` every ``--probe-ms``
(10) ms over one keep-alive connection and records each answer's latency. ``/healthz`` does no
work, so a probe's latency beyond its baseline is time the event loop was busy with something else.
Requests, one at a time, each after a few seconds of idle probing:

- ``pairwise max``: ``/pairwise`` with ``limits.max_items`` (256) items whose prompt, response_a and
  response_b are each ``limits.max_text_chars`` (32,000) characters: a 24.6 MB body, under
  ``limits.max_body_bytes``. Each item is longer than the judge's context, so the engine refuses it
  (a per-item error): what is left is the API process's own work (reading and parsing the body,
  validation, tokenising 256 x ~24k tokens in the tokeniser thread, per-item bookkeeping, the answer);
- ``pairwise fit``: ``/pairwise`` with 256 items short enough to be judged (``--fit-chars``), so the
  engine's outputs stream back through the event loop while the probe runs;
- ``winrate max``: ``/winrate`` over a group of ``limits.max_group_size`` (64) responses of
  ``--winrate-chars`` characters (default: 32,000), ``order=both`` (4,032 engine requests, the
  largest ``limits.max_request_cost`` allows), prompt of the same length. Each comparison is longer
  than the context: tokenisation and bookkeeping only.

During each big request a one-item ``/pairwise`` is sent (``--small-after`` s in) and timed: what
another client waits while the big request is handled (tokenisation runs in one thread per engine).
The win-rate request is cut off by the client after ``--winrate-timeout`` (60) s: tokenising its
4,032 comparisons of ~15k tokens takes about a quarter of an hour here.

With ``--asyncio-debug`` the same requests go to a second server started with
``PYTHONASYNCIODEBUG=1`` (asyncio's debug mode: every callback or task step that holds the loop
over ``slow_callback_duration``, 0.1 s, is logged with its coroutine), and the slow steps are
collected from its log: where a stall comes from. Debug mode slows the loop down, so its figures
are for attribution, the first server's for the stall itself. Also measured in this process,
without a server: parsing the largest body (``json.loads``) and validating it with the request
model (``PairwiseRequest.model_validate``), the work FastAPI does in the event loop before the
route runs.

Writes ``--output`` (JSON) and prints a table. About 5 minutes (most of it tokenising the win-rate
group). Must run alone on the machine's cores (under the shared lock in this project):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_stall.py --asyncio-debug
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import multiprocessing as mp
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tenants import DATA, start_server, stop_server  # noqa: E402

WORDS = re.compile(r"[A-Za-z']+")


def vocabulary() -> list[str]:
    words = []
    for line in DATA.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            words += WORDS.findall(row["prompt"] + " " + row["chosen"])
    return sorted(set(words))


def text(rng: random.Random, vocab: list[str], chars: int, tag: str) -> str:
    """``chars`` characters of English words in random order (a realistic tokens-per-character
    ratio), starting with ``tag`` so that no two texts are alike."""
    out, n = [tag], len(tag)
    while n < chars:
        w = rng.choice(vocab)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)[:chars]


def probe(url: str, period_s: float, stop, results) -> None:
    """In a child process: GET /healthz every ``period_s``; (start, latency) of each probe."""
    samples = []
    with httpx.Client(base_url=url, timeout=600) as client:
        next_t = time.monotonic()
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                ok = client.get("/healthz").status_code == 200
            except httpx.HTTPError:
                ok = False
            samples.append((t0, time.monotonic() - t0, ok))
            next_t = max(next_t + period_s, time.monotonic())
            time.sleep(max(0.0, next_t - time.monotonic()))
    results.put(samples)


def stats(samples: list, t0: float, t1: float) -> dict:
    """The probes that were answered while [t0, t1] (those that started before t1)."""
    lat = sorted(s[1] for s in samples if t0 <= s[0] + s[1] and s[0] <= t1)
    if not lat:
        return {"n": 0}
    done = sorted(s[0] + s[1] for s in samples if t0 <= s[0] + s[1] and s[0] <= t1)
    gaps = [b - a for a, b in itertools.pairwise(done)] or [0.0]
    return {
        "n": len(lat),
        "median_ms": statistics.median(lat) * 1e3,
        "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3,
        "max_ms": lat[-1] * 1e3,
        "max_gap_ms": max(gaps) * 1e3,
        "over_50ms": sum(x > 0.05 for x in lat),
        "over_100ms": sum(x > 0.1 for x in lat),
        "busy_s_over_20ms": sum(x for x in lat if x > 0.02),
    }


def requests(args, limits) -> list[tuple[str, str, dict]]:
    rng = random.Random(0)
    vocab = vocabulary()
    n, chars = limits.max_items, limits.max_text_chars
    big = [
        {
            "prompt": text(rng, vocab, chars, f"[item {i} prompt]"),
            "response_a": text(rng, vocab, chars, f"[item {i} A]"),
            "response_b": text(rng, vocab, chars, f"[item {i} B]"),
        }
        for i in range(n)
    ]
    fit = [
        {
            "prompt": text(rng, vocab, args.fit_chars * 2, f"[fit {i} prompt]"),
            "response_a": text(rng, vocab, args.fit_chars, f"[fit {i} A]"),
            "response_b": text(rng, vocab, args.fit_chars, f"[fit {i} B]"),
        }
        for i in range(n)
    ]
    group = [text(rng, vocab, args.winrate_chars, f"[response {i}]") for i in range(limits.max_group_size)]
    out = [
        ("pairwise max", "/pairwise", {"mode": "logprob", "order": "single", "cache": False, "items": big}),
        ("pairwise fit", "/pairwise", {"mode": "logprob", "order": "single", "cache": False, "items": fit}),
        (
            "winrate max",
            "/winrate",
            {
                "order": "both",
                "cache": False,
                "prompt": text(rng, vocab, args.winrate_chars, "[question]"),
                "responses": group,
            },
        ),
    ]
    return [r for r in out if r[0] in args.cases]


def offline_parse(body: bytes) -> dict:
    """The event loop's share of receiving the largest body, measured in this process: parsing it
    and validating it with the route's request model, as FastAPI does before the route runs."""
    from referee.protocol import PairwiseRequest

    t0 = time.perf_counter()
    data = json.loads(body)
    t1 = time.perf_counter()
    req = PairwiseRequest.model_validate(data)
    t2 = time.perf_counter()
    req.model_dump()  # the idempotency cache / logging may touch the model again
    t3 = time.perf_counter()
    ms = lambda a, b: (b - a) * 1e3  # noqa: E731
    return {"json_loads_ms": ms(t0, t1), "validate_ms": ms(t1, t2), "model_dump_ms": ms(t2, t3)}


SMALL = {"mode": "logprob", "order": "single", "cache": False,
         "items": [{"prompt": "What is 2 + 2?", "response_a": "4", "response_b": "5"}]}  # fmt: skip


def big_request(url: str, path: str, raw: bytes, timeout: float, out: dict) -> None:
    """In a thread: send one big request, record what came back."""
    t0 = time.monotonic()
    try:
        with httpx.Client(base_url=url, timeout=timeout) as client:
            resp = client.post(path, content=raw, headers={"content-type": "application/json"})
        status, answer = resp.status_code, resp.json()
    except httpx.HTTPError as exc:
        status, answer = None, {"error": f"{type(exc).__name__}: {exc}"}
    answer = answer if isinstance(answer, dict) else {}
    errors = [r.get("error") for r in answer.get("results", [])]
    out.update(
        status=status,
        request_s=time.monotonic() - t0,
        client_error=answer.get("error") if status is None else None,
        item_errors=sum(e is not None for e in errors),
        first_error=next((e for e in errors if e), None) or (answer.get("errors") or [None])[0],
        engine_requests=(answer.get("usage") or {}).get("engine_requests"),
    )


def loop_profile(path: Path, top: int = 12) -> dict:
    """From py-spy's raw samples: the event-loop thread's (the main thread) busiest
    innermost frames, and its busiest frames of referee's own code."""
    from collections import Counter

    leaf: Counter = Counter()
    ours: Counter = Counter()
    loop = other = 0
    if not path.exists():
        return {"error": f"no py-spy output at {path}"}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames, n = stack.split(";"), int(count)
        if "MainThread" not in frames[0] and not any("uvicorn" in f for f in frames):
            other += n
            continue
        loop += n
        leaf[frames[-1]] += n
        mine = [f for f in frames if "reward_server" in f or "referee" in f]
        if mine:
            ours[mine[-1]] += n
    return {
        "event_loop_samples": loop,
        "other_thread_samples": other,
        "loop_leaf_frames": leaf.most_common(top),
        "loop_innermost_referee_frames": ours.most_common(top),
    }


def run_server(args, config: Path, log: Path, cases, debug: bool) -> dict:
    env_debug = os.environ.get("PYTHONASYNCIODEBUG")
    if debug:
        os.environ["PYTHONASYNCIODEBUG"] = "1"  # start_server copies os.environ
    try:
        proc, url = start_server(config, log)
    finally:
        if env_debug is None:
            os.environ.pop("PYTHONASYNCIODEBUG", None)
    out: dict = {}
    ctx = mp.get_context("spawn")
    stop, queue = ctx.Event(), ctx.Queue()
    child = ctx.Process(target=probe, args=(url, args.probe_ms / 1e3, stop, queue), daemon=True)
    try:
        with httpx.Client(base_url=url, timeout=args.timeout) as client:
            client.post("/pairwise", json=SMALL)  # warm-up
            client.post("/winrate", json={"prompt": "Hi", "responses": ["a", "b", "c"]})
            t = time.monotonic()
            client.post("/pairwise", json=SMALL)
            small_idle = time.monotonic() - t
            child.start()
            time.sleep(args.idle + 2)  # the probe's process starts
            marks = [("idle", time.monotonic() - args.idle, time.monotonic())]
            for name, path, body in cases:
                raw = json.dumps(body).encode()
                rec: dict = {"body_mb": len(raw) / 1e6, "small_request_idle_s": small_idle}
                timeout = args.winrate_timeout if path == "/winrate" else args.timeout
                thread = threading.Thread(target=big_request, args=(url, path, raw, timeout, rec))
                spy = None
                if args.py_spy:  # sample the API process's stacks while it handles this request
                    slug = re.sub(r"\W+", "-", name)
                    spy_out = log.parent / f"pyspy-{'debug-' if debug else ''}{slug}.txt"
                    spy = subprocess.Popen(
                        [args.py_spy, "record", "--pid", str(proc.pid), "--threads", "--rate", "50",
                         "--format", "raw", "--output", str(spy_out)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )  # fmt: skip
                t0 = time.monotonic()
                thread.start()
                # A one-item request sent while the big one is being handled: head-of-line waits
                time.sleep(args.small_after)
                ts = time.monotonic()
                try:  # another job's request (its own fair-queuing flow), unless --small-same-job
                    hdr = {} if args.small_same_job else {"X-Referee-Job": "small-probe"}
                    ok = client.post("/pairwise", json=SMALL, headers=hdr).status_code
                except httpx.HTTPError as exc:
                    ok = type(exc).__name__
                rec["small_request_during_s"] = time.monotonic() - ts
                rec["small_request_status"] = ok
                thread.join()
                if spy is not None:
                    spy.send_signal(signal.SIGINT)  # py-spy writes its samples on Ctrl-C
                    spy.wait(timeout=60)
                    rec["py_spy"] = loop_profile(spy_out)
                t1 = t0 + rec["request_s"]
                marks.append((name, t0, t1))
                out[name] = rec
                status = f"HTTP {rec['status']} {rec.get('client_error') or ''}"
                small = rec["small_request_during_s"]
                print(f"  {name}: {status}, {rec['request_s']:.1f} s; a small request sent "
                      f"{args.small_after:g} s in took {small:.1f} s", flush=True)  # fmt: skip
                time.sleep(args.idle)
        stop.set()
        samples = queue.get(timeout=60)
        child.join(timeout=30)
        for name, t0, t1 in marks:
            out.setdefault(name, {})["probe"] = stats(samples, t0, t1)
    finally:
        if child.is_alive():
            child.kill()
        stop_server(proc)
    if debug:
        slow = re.compile(r"Executing (.*) took (\d+\.\d+) seconds")
        found = [(float(m.group(2)), m.group(1)) for m in map(slow.search, log.read_text().splitlines()) if m]
        out["slow_steps"] = [{"s": s, "what": w[:600]} for s, w in sorted(found, reverse=True)[:15]]
        out["slow_steps_total"] = {"n": len(found), "s": sum(s for s, _ in found)}
    return out


def table(res: dict) -> str:
    lines = [
        "| request | body MB | HTTP | request s | probes | probe median ms | p99 ms | worst ms "
        "| probes > 100 ms | one-item /pairwise sent meanwhile: s (idle server: s) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, r in res["plain"].items():
        p = r.get("probe", {})
        if not p.get("n"):
            continue
        small = ""
        if "small_request_during_s" in r:
            small = f"{r['small_request_during_s']:.1f} ({r['small_request_idle_s']:.2f})"
        lines.append(
            f"| {name} | {r.get('body_mb', 0):.1f} | {r.get('status', '')} | {r.get('request_s', 0):.1f} "
            f"| {p['n']} | {p['median_ms']:.1f} | {p['p99_ms']:.0f} | **{p['max_ms']:.0f}** "
            f"| {p['over_100ms']} | {small} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default="pairwise max,pairwise fit,winrate max")
    parser.add_argument("--fit-chars", type=int, default=150, help="pairwise fit: response chars (prompt 2x)")
    parser.add_argument("--winrate-chars", type=int, default=None, help="default: limits.max_text_chars")
    parser.add_argument("--probe-ms", type=float, default=10.0)
    parser.add_argument("--idle", type=float, default=3.0, help="idle probing before and after each request")
    parser.add_argument("--timeout", type=float, default=600.0, help="client timeout of each request")
    parser.add_argument("--winrate-timeout", type=float, default=60.0,
                        help="client timeout of the win-rate request (the largest group takes ~15 min "
                        "to tokenise here; the stall pattern shows in the first minute)")  # fmt: skip
    parser.add_argument("--small-after", type=float, default=5.0,
                        help="a one-item /pairwise is sent this long after each big request")  # fmt: skip
    parser.add_argument("--small-same-job", action="store_true",
                        help="the one-item request in the big one's job (default: another)")  # fmt: skip
    parser.add_argument("--asyncio-debug", action="store_true", help="attribute the stalls (second server)")
    parser.add_argument("--py-spy", help="a py-spy binary: sample the API process during each request")
    parser.add_argument("--output", type=Path, default=Path("/tmp/bench_stall/results.json"))
    args = parser.parse_args()
    args.cases = args.cases.split(",")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    from reward_server.settings import Limits

    limits = Limits()
    args.winrate_chars = args.winrate_chars or limits.max_text_chars
    cases = requests(args, limits)
    started = time.monotonic()
    parse = offline_parse(json.dumps(cases[0][2]).encode()) if cases[0][0] == "pairwise max" else {}
    print(f"offline parse of the largest body: {parse}", flush=True)
    config = args.output.parent / "judges.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "judges": [
                    {
                        "name": "smollm2",
                        "kind": "generative",
                        "model": "embedded:smollm2",
                        "engine": {"dtype": "auto", "max_model_len": 4096, "kv_cache_memory_gib": 1.0},
                    }
                ]
            }
        )
    )
    result = {"offline_parse": parse}
    print("server (plain):", flush=True)
    result["plain"] = run_server(args, config, args.output.parent / "server.log", cases, debug=False)
    if args.asyncio_debug:
        print("server (PYTHONASYNCIODEBUG=1):", flush=True)
        result["debug"] = run_server(args, config, args.output.parent / "server-debug.log", cases, debug=True)
    import vllm

    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    result.update(
        date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        commit=commit,
        command="HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_stall.py " + " ".join(sys.argv[1:]),
        machine=f"{os.cpu_count()} cores, vllm {vllm.__version__}",
        limits=limits.model_dump(),
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        wall_s=time.monotonic() - started,
    )
    args.output.write_text(json.dumps(result, indent=2))
    print()
    print(table(result))
    for name, r in result["plain"].items():
        if "py_spy" in r:
            samples = r["py_spy"].get("event_loop_samples")
            print(f"\nevent-loop thread during {name} (py-spy): {samples} samples")
            for frame, n in r["py_spy"].get("loop_innermost_referee_frames", [])[:8]:
                print(f"  {n:6d}  {frame[:160]}")
            for frame, n in r["py_spy"].get("loop_leaf_frames", [])[:8]:
                print(f"  {n:6d}  leaf {frame[:155]}")
    if "debug" in result:
        print("\nslow event-loop steps (asyncio debug):")
        for s in result["debug"].get("slow_steps", []):
            print(f"  {s['s']:.3f} s  {s['what'][:200]}")
    print(f"\nresults: {args.output} ({result['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
