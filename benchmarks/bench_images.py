"""Group win rates over images: referee's /winrate against the Pref-GRPO client pattern.

Pref-GRPO's reward client sends one chat request per pair of a group's images to a vLLM server,
both images inline as base64 (single order: N(N-1)/2 = 28 requests for a group of 8). Here both
systems serve the same tiny vision-language judge (``tests.model_factory.make_tiny_vlm``: random
weights, Idefics3 architecture, images resized to 128x128 by its processor) with the same vLLM
CPU engine settings, one after the other, and ask for the same thing: a one-token verdict with
its log-probabilities.

- referee, order=single: one /winrate call per group (28 engine requests), images inline;
- referee, order=both: the position-debiased win rate (56 engine requests), images inline;
- referee, order=both, upload once: the group's 8 images sent with POST /blobs, then referenced;
- the pattern: 28 /v1/chat/completions calls per group, 16 client threads (here: 16 concurrent
  requests), against vLLM's own OpenAI-compatible server.

Reported: groups/s and images/s (8 per group), engine requests per group, and request bytes sent
per group. The images are 512x512 PNGs of noise (incompressible, about 0.75 MB each), as generated
images are; the judge sees them at 128x128 either way.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_images.py [--groups 12]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import random
import sys
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_throughput import start_server, stop_server, write_section  # noqa: E402

HEADING = "## Images: group win rates against the Pref-GRPO client pattern"
BEGIN, END = "<!-- bench_images:begin -->", "<!-- bench_images:end -->"
GROUP = 8
PROMPT = "A red fox standing in fresh snow at dawn."
ENGINE = {"dtype": "float32", "max_model_len": 2048, "kv_cache_memory_gib": 0.5, "enforce_eager": True}


def make_images(groups: int, side: int, seed: int = 0) -> list[list[bytes]]:
    from PIL import Image

    rng = random.Random(seed)
    out = []
    for _ in range(groups):
        group = []
        for _ in range(GROUP):
            buffer = io.BytesIO()
            Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3)).save(buffer, format="PNG")
            group.append(buffer.getvalue())
        out.append(group)
    return out


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


class Counter:
    def __init__(self) -> None:
        self.bytes = 0

    async def request(self, request: httpx.Request) -> None:
        self.bytes += len(request.content) + sum(len(k) + len(v) for k, v in request.headers.raw)


async def run_referee(
    url: str, groups: list[list[bytes]], order: str, upload: bool, concurrency: int
) -> dict:
    counter = Counter()
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url, timeout=600, limits=limits, event_hooks={"request": [counter.request]}
    ) as http:
        sem = asyncio.Semaphore(concurrency)
        invalid = 0

        async def one(group: list[bytes]) -> None:
            nonlocal invalid
            async with sem:
                if upload:
                    ids = []
                    for raw in group:
                        r = await http.post("/blobs", content=raw)
                        r.raise_for_status()
                        ids.append(r.json()["id"])
                    responses = [[{"type": "image", "blob": i}] for i in ids]
                else:
                    responses = [[{"type": "image", "data": b64(raw)}] for raw in group]
                r = await http.post(
                    "/winrate",
                    json={"judge": "vlm", "prompt": PROMPT, "responses": responses, "order": order},
                )
                r.raise_for_status()
                invalid += r.json()["invalid"]

        start = time.perf_counter()
        await asyncio.gather(*[one(g) for g in groups])
        elapsed = time.perf_counter() - start
    return {
        "elapsed": elapsed,
        "bytes": counter.bytes,
        "invalid": invalid,
        "requests": 28 * (2 if order == "both" else 1),
    }


async def run_pattern(url: str, model: str, groups: list[list[bytes]], concurrency: int) -> dict:
    counter = Counter()
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url, timeout=600, limits=limits, event_hooks={"request": [counter.request]}
    ) as http:
        sem = asyncio.Semaphore(concurrency)
        invalid = 0

        async def pair(a: bytes, b: bytes) -> None:
            nonlocal invalid
            content = [
                {"type": "text", "text": f"Prompt: {PROMPT}\nImage A:"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(a)}},
                {"type": "text", "text": "Image B:"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(b)}},
                {
                    "type": "text",
                    "text": "Which image better matches the prompt? Answer with the single letter A or B.",
                },
            ]
            body = {
                "model": model,
                "messages": [{"role": "user", "content": content}],
                "max_tokens": 1,
                "logprobs": True,
                "top_logprobs": 20,
                "temperature": 0,
            }
            async with sem:
                r = await http.post("/v1/chat/completions", json=body)
            r.raise_for_status()
            invalid += not r.json()["choices"][0]["logprobs"]

        start = time.perf_counter()
        await asyncio.gather(
            *[pair(g[i], g[j]) for g in groups for i in range(GROUP) for j in range(i + 1, GROUP)]
        )
        elapsed = time.perf_counter() - start
    return {"elapsed": elapsed, "bytes": counter.bytes, "invalid": invalid, "requests": 28}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=12)
    parser.add_argument("--side", type=int, default=512, help="Image side in pixels (PNG of noise).")
    parser.add_argument("--port", type=int, default=8931)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/referee-bench-images"))
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from referee.embedded import ensure_embedded
    from tests.model_factory import make_tiny_vlm

    model = str(make_tiny_vlm(args.workdir / "tiny-vlm", ensure_embedded("smollm2")))
    groups = make_images(args.groups, args.side)
    warm = make_images(1, args.side, seed=99)
    rows: list[tuple[str, dict]] = []

    config = {
        "judges": [
            {"name": "vlm", "kind": "generative", "model": model, "min_label_mass": 0.0, "engine": ENGINE}
        ],
        "limits": {
            "max_inflight_engine_requests": 100_000,
            "max_body_bytes": 64 << 20,
            "max_request_cost": 100_000,
        },
        "media": {"max_image_bytes": 4 << 20, "max_images": 64},
    }
    path = args.workdir / "referee.yaml"
    path.write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{args.port}"
    cmd = [sys.executable, "-m", "referee.cli", "serve", "--config", str(path), "--port", str(args.port)]
    print("referee: starting", flush=True)
    proc = start_server(cmd, args.workdir / "referee.log", url + "/readyz")
    try:
        asyncio.run(run_referee(url, warm, "single", False, 4))
        for name, order, upload in [
            ("referee /winrate, order=single, inline", "single", False),
            ("referee /winrate, order=both, inline", "both", False),
            ("referee /winrate, order=both, upload once", "both", True),
        ]:
            result = asyncio.run(run_referee(url, groups, order, upload, 4))
            rows.append((name, result))
            print(name, result, flush=True)
    finally:
        stop_server(proc)

    port = args.port + 1
    opts = (
        f"--host 127.0.0.1 --port {port} --dtype float32 --enforce-eager --seed 0 --max-model-len 2048 "
        f"--kv-cache-memory-bytes {int(0.5 * (1 << 30))} --enable-prefix-caching"
    )
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *opts.split()]
    print("vLLM server: starting", flush=True)
    proc = start_server(cmd, args.workdir / "vllm.log", f"http://127.0.0.1:{port}/health")
    try:
        asyncio.run(run_pattern(f"http://127.0.0.1:{port}", model, warm, 16))
        result = asyncio.run(run_pattern(f"http://127.0.0.1:{port}", model, groups, 16))
        rows.append(("Pref-GRPO pattern: 28 chat calls per group, 16 threads, vLLM server", result))
        print(rows[-1], flush=True)
    finally:
        stop_server(proc)

    base = rows[-1][1]
    base_gps = len(groups) / base["elapsed"]
    lines = [
        f"Command: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_images.py --groups {args.groups}` "
        f"({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores; {args.groups} groups of {GROUP} "
        f"{args.side}x{args.side} PNGs; tiny Idefics3 judge, float32, the same engine settings for both).",
        "",
        "| system | groups/s | images/s | engine requests / group | MB sent / group | × pattern (groups/s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        gps = len(groups) / r["elapsed"]
        lines.append(
            f"| {name} | {gps:.2f} | {gps * GROUP:.1f} | {r['requests']} | "
            f"{r['bytes'] / len(groups) / 1e6:.2f} | {gps / base_gps:.2f} |"
        )
    write_section(args.output, "\n".join(lines), HEADING, BEGIN, END)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
