"""GPU smoke test: serve a judges file, ask each judge one question per route it serves, print a
pass/fail table, and optionally a short throughput figure against ``vllm serve`` of the same model.

    make gpu-smoke                                  # deploy/judges.gpu.yaml
    make gpu-smoke JUDGES=my-judges.yaml ARGS="--vllm-compare"
    python scripts/gpu_smoke.py --url http://127.0.0.1:8000    # a server that is already up

The calls come from the judges file alone (``plan``): every judge's routes as its kind declares
them (``judges.registry.capabilities``): /score, /pairwise (and an image pair for a judge whose
engine takes images), /judge, /winrate, and the compatibility routes /get_reward (OpenRLHF) and
/classify (vLLM) where the kind serves them. A call passes when it answers 200 with a value (a
score, a probability, a verdict, a win rate), not an error or an invalid verdict.

The throughput figure (``--vllm-compare``): the same single-token pairwise questions, first through
referee's /pairwise (mode=logprob), then straight to ``vllm serve`` of the judge's model as chat
completions (the prompt referee builds, one next token with its top log-probabilities), after
referee has stopped and given the GPU back. Both run on this machine's GPU, one after the other.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_JUDGES = REPO / "deploy" / "judges.gpu.yaml"

QUESTION = "What is the capital of France?"
GOOD, BAD = "The capital of France is Paris.", "The capital of France is Lyon."
GROUP = [GOOD, BAD, "Paris.", "I like turtles."]
CAPTION = "a red square on a white background"


# ---------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gpu_smoke",
        description="Serve a judges file and ask each judge one question per route (needs a GPU).",
    )
    p.add_argument("--judges", type=Path, default=DEFAULT_JUDGES, help="judges file (default: %(default)s)")
    p.add_argument("--url", default=None, help="ask a server that is already running instead of starting one")
    p.add_argument("--port", type=int, default=8000, help="port of the server started here")
    p.add_argument(
        "--start-timeout", type=float, default=1800.0, help="seconds to wait for /readyz (first downloads)"
    )
    p.add_argument(
        "--api-key", default=os.environ.get("REFEREE_API_KEY"), help="a tenant key, if the file has tenants"
    )
    p.add_argument(
        "--vllm-compare",
        action="store_true",
        help="also time pairwise questions against `vllm serve` of the same model",
    )
    p.add_argument(
        "--throughput-judge", default=None, help="the generative judge to time (default: the first)"
    )
    p.add_argument("--pairs", type=int, default=256, help="pairwise questions in the throughput figure")
    p.add_argument(
        "--vllm-port", type=int, default=8100, help="port of the `vllm serve` started for the figure"
    )
    args = p.parse_args(argv)
    if args.url is None and not args.judges.is_file():
        p.error(f"--judges {args.judges} is not a file")
    if args.pairs < 1:
        p.error("--pairs must be at least 1")
    if args.url is not None and args.vllm_compare:
        p.error("--vllm-compare needs the GPU to itself: it starts and stops the server; leave out --url")
    return args


# ---------------------------------------------------------------- the plan of calls


@dataclass(frozen=True)
class Call:
    judge: str
    kind: str
    route: str  # the row's label: "/pairwise (image)", ...
    path: str  # the HTTP path, with its query
    body: dict[str, Any]


def _png(rgb: tuple[int, int, int], size: int = 64) -> str:
    """Base64 of a one-colour PNG, made here (no file, no download)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _image(rgb: tuple[int, int, int]) -> list[dict]:
    return [{"type": "image", "data": _png(rgb)}]


def takes_images(settings) -> bool:
    """Whether a judge's engine is configured for images (``limit_mm_per_prompt.image`` > 0)."""
    from reward_server.judges.generative import images_per_prompt

    engine = getattr(settings, "engine", None)
    limit = images_per_prompt(getattr(engine, "extra", None) or {})
    return bool(limit)


def load_settings(path: Path):
    """The judges file as the server reads it (the same validation: an invalid file fails here)."""
    import yaml

    from reward_server.settings import ServerSettings

    return ServerSettings(**(yaml.safe_load(path.read_text()) or {}))


def plan(settings) -> list[Call]:
    """One call per route and kind that each judge of ``settings`` serves, in the file's order."""
    from reward_server.judges.registry import capabilities

    calls: list[Call] = []
    for cfg in settings.judges:
        caps = capabilities(cfg, settings.judges)
        name, kind = cfg.name, cfg.kind
        generative = "cot" in caps.pairwise_modes

        def add(route: str, path: str, body: dict, *, name=name, kind=kind) -> None:
            calls.append(Call(name, kind, route, path, body))

        if "score" in caps.routes:
            add("/score", "/score", {"judge": name, "items": [{"prompt": QUESTION, "response": GOOD}]})
        if "pairwise" in caps.routes:
            body = {
                "judge": name,
                "order": "both",
                "items": [{"prompt": QUESTION, "response_a": GOOD, "response_b": BAD}],
            }
            add("/pairwise", "/pairwise", body if not generative else {**body, "mode": "logprob"})
            if generative and takes_images(cfg):
                item = {
                    "prompt": CAPTION,
                    "response_a": _image((220, 20, 20)),
                    "response_b": _image((20, 20, 220)),
                }
                add(
                    "/pairwise (image)",
                    "/pairwise",
                    {"judge": name, "mode": "cot", "order": "both", "max_new_tokens": 1024, "items": [item]},
                )
        if "judge" in caps.routes:
            add(
                "/judge",
                "/judge",
                {
                    "judge": name,
                    "max_new_tokens": 1024,
                    "items": [{"prompt": QUESTION, "response_a": GOOD, "response_b": BAD}],
                },
            )
        if "winrate" in caps.routes:
            body = {"judge": name, "prompt": QUESTION, "responses": GROUP}
            add("/winrate", "/winrate", body if not generative else {**body, "mode": "logprob"})
        if caps.pointwise and "score" in caps.routes:
            add(
                "/get_reward",
                f"/get_reward?judge={name}",
                {"query": [QUESTION + " " + GOOD], "prompts": [QUESTION]},
            )
        if "formatted_text" in caps.abilities:
            add(
                "/classify",
                "/classify",
                {
                    "model": name,
                    "messages": [
                        {"role": "user", "content": QUESTION},
                        {"role": "assistant", "content": GOOD},
                    ],
                },
            )
    return calls


def check(call: Call, status: int, body: Any) -> tuple[bool, str]:
    """Whether an answer passes, and what it said (a value, or why it failed)."""
    if status != 200:
        message = body.get("message") or body.get("detail") if isinstance(body, dict) else body
        return False, f"HTTP {status}: {str(message)[:120]}"
    path = call.path.split("?")[0]
    if path in ("/score", "/judge", "/pairwise"):
        results = body.get("results") or []
        if not results:
            return False, "no results"
        r = results[0]
        if r.get("error") or r.get("verdict") == "invalid":
            return False, f"{r.get('verdict') or 'no value'}: {str(r.get('error'))[:120]}"
        if path == "/score":
            return (r.get("score") is not None), f"score {r.get('score')}"
        if path == "/pairwise":
            return (r.get("p_a") is not None), f"p_a {r.get('p_a')}, verdict {r.get('verdict')}"
        value = r.get("verdict") or r.get("score")
        return value is not None, f"{r.get('kind')} {value}"
    if path == "/winrate":
        rates = body.get("win_rates") or []
        return bool(rates) and None not in rates, f"win rates {rates}"
    if path == "/get_reward":
        rewards = body.get("rewards") or []
        return bool(rewards), f"rewards {rewards}"
    if path == "/classify":
        data = body.get("data") or []
        return bool(data) and bool(data[0].get("probs")), f"probs {data[0].get('probs') if data else None}"
    return False, f"no check for {path}"


@dataclass
class Row:
    call: Call
    ok: bool
    detail: str
    seconds: float = field(default=0.0)


def render(rows: list[Row]) -> str:
    """The pass/fail table, then a one-line summary."""
    head = ("judge", "kind", "route", "result", "s", "answer")
    table = [head] + [
        (
            r.call.judge,
            r.call.kind,
            r.call.route,
            "PASS" if r.ok else "FAIL",
            f"{r.seconds:.1f}",
            r.detail[:90],
        )
        for r in rows
    ]
    widths = [max(len(line[k]) for line in table) for k in range(len(head) - 1)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(line[:-1], widths, strict=True)) + "  " + line[-1]
        for line in table
    ]
    failed = sum(not r.ok for r in rows)
    lines.append(f"{len(rows) - failed}/{len(rows)} passed" + (f", {failed} FAILED" if failed else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------- throughput against vllm serve


def throughput_judge(settings, name: str | None):
    """The generative judge the throughput figure times: ``name``, or the file's first."""
    generative = [j for j in settings.judges if j.kind == "generative" and getattr(j, "engine", None)]
    if name is not None:
        match = [j for j in generative if j.name == name]
        if not match:
            raise SystemExit(
                f"--throughput-judge {name}: not a generative judge of the file "
                f"({[j.name for j in generative]})"
            )
        return match[0]
    if not generative:
        raise SystemExit("--vllm-compare: the file has no generative judge to time")
    return generative[0]


def pairs_for(n: int) -> list[tuple[str, str, str]]:
    """n distinct pairwise questions (distinct prompts: none reads another's prefix from the cache
    beyond what both servers share alike)."""
    return [(f"{QUESTION} (question {k})", f"{GOOD} ({k})", f"{BAD} ({k})") for k in range(n)]


def vllm_serve_command(cfg, port: int) -> list[str]:
    """``vllm serve`` of a judge's model with the engine settings referee gives it (one GPU)."""
    e = cfg.engine
    cmd = [
        "vllm",
        "serve",
        cfg.model,
        "--port",
        str(port),
        "--dtype",
        e.dtype if e.dtype != "auto" else "auto",
    ]
    if e.max_model_len:
        cmd += ["--max-model-len", str(e.max_model_len)]
    cmd += ["--gpu-memory-utilization", str(e.gpu_memory_utilization or 0.9)]
    cmd += ["--tensor-parallel-size", str(e.tensor_parallel_size)]
    if "limit_mm_per_prompt" in e.extra:
        cmd += ["--limit-mm-per-prompt", json.dumps(e.extra["limit_mm_per_prompt"])]
    return cmd


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:.1f} pairs/s" if seconds > 0 else "n/a"


def figure(cfg, n: int, ours: float, theirs: float) -> str:
    """The throughput line: both rates and referee's as a share of vllm serve's."""
    share = f"{theirs / ours:.2f}x" if ours > 0 else "n/a"
    return (
        f"throughput, {cfg.name} ({cfg.model}), {n} single-token pairwise questions: referee "
        f"{rate(n, ours)}, vllm serve {rate(n, theirs)} (referee/vllm {share})"
    )


async def _referee_pairs(client, url: str, judge: str, pairs, headers) -> float:
    items = [{"prompt": q, "response_a": a, "response_b": b} for q, a, b in pairs]
    chunks = [items[k : k + 32] for k in range(0, len(items), 32)]
    start = time.perf_counter()
    answers = await asyncio.gather(
        *[
            client.post(
                f"{url}/pairwise",
                json={"judge": judge, "mode": "logprob", "order": "single", "items": c},
                headers=headers,
            )
            for c in chunks
        ]
    )
    seconds = time.perf_counter() - start
    bad = [r.status_code for r in answers if r.status_code != 200]
    if bad:
        raise SystemExit(f"referee answered {bad[:5]} during the throughput run")
    return seconds


async def _vllm_pairs(client, url: str, model: str, pairs) -> float:
    from reward_server import templates

    async def one(q, a, b):
        messages = templates.pairwise_logprob(q, a, b, None)
        r = await client.post(
            f"{url}/v1/chat/completions",
            json={
                "model": model,
                "messages": messages,
                "max_tokens": 1,
                "logprobs": True,
                "top_logprobs": 20,
                "temperature": 0,
            },
        )
        r.raise_for_status()

    start = time.perf_counter()
    await asyncio.gather(*[one(*p) for p in pairs])
    return time.perf_counter() - start


# ---------------------------------------------------------------- running it


def _wait(url: str, path: str, timeout: float, proc: subprocess.Popen | None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(
                f"the server exited with code {proc.returncode} before it was ready (see its log above)"
            )
        try:
            if httpx.get(url + path, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(3)
    raise SystemExit(f"{url}{path} was not ready after {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_calls(url: str, calls: list[Call], headers: dict) -> list[Row]:
    import httpx

    rows = []
    with httpx.Client(timeout=600) as client:
        for call in calls:
            start = time.perf_counter()
            try:
                r = client.post(url + call.path, json=call.body, headers=headers)
                try:
                    body = r.json()
                except ValueError:
                    body = r.text
                ok, detail = check(call, r.status_code, body)
            except httpx.HTTPError as exc:
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            rows.append(Row(call, ok, detail, time.perf_counter() - start))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    proc = None
    if args.url is None:
        settings = load_settings(args.judges)
        url = f"http://127.0.0.1:{args.port}"
        referee = shutil.which("referee") or str(Path(sys.executable).parent / "referee")
        print(f"serving {args.judges} on {url} (the first start downloads the models) ...", flush=True)
        proc = subprocess.Popen([referee, "serve", "--config", str(args.judges), "--port", str(args.port)])
    else:
        import httpx

        url = args.url.rstrip("/")
        settings = load_settings(args.judges) if args.judges.is_file() else None
        if settings is None:
            raise SystemExit("--url: give --judges, the file the server serves, to plan the calls")
        httpx.get(url + "/healthz", timeout=10).raise_for_status()
    try:
        _wait(url, "/readyz", args.start_timeout, proc)
        rows = run_calls(url, plan(settings), headers)
        print(render(rows), flush=True)
        if args.vllm_compare:
            import httpx

            cfg = throughput_judge(settings, args.throughput_judge)
            pairs = pairs_for(args.pairs)

            async def timed(fn, *a):
                async with httpx.AsyncClient(timeout=600) as client:
                    return await fn(client, *a)

            asyncio.run(timed(_referee_pairs, url, cfg.name, pairs[:8], headers))  # warm-up
            ours = asyncio.run(timed(_referee_pairs, url, cfg.name, pairs, headers))
            _stop(proc)
            proc = None
            vurl = f"http://127.0.0.1:{args.vllm_port}"
            print(f"starting {' '.join(vllm_serve_command(cfg, args.vllm_port))} ...", flush=True)
            vproc = subprocess.Popen(vllm_serve_command(cfg, args.vllm_port))
            try:
                _wait(vurl, "/health", args.start_timeout, vproc)
                asyncio.run(timed(_vllm_pairs, vurl, cfg.model, pairs[:8]))
                theirs = asyncio.run(timed(_vllm_pairs, vurl, cfg.model, pairs))
            finally:
                _stop(vproc)
            print(figure(cfg, len(pairs), ours, theirs), flush=True)
        return 0 if all(r.ok for r in rows) else 1
    finally:
        if proc is not None:
            _stop(proc)


if __name__ == "__main__":
    sys.exit(main())
