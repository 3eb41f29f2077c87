"""Process reward models: referee's ``/score`` (kind prm) against vLLM's own ``/pooling`` endpoint
(``vllm serve`` of the same model), on the same solutions, in one run.

The model is the tests' tiny ``Qwen2ForProcessRewardModel`` (``tests/model_factory.py``, the
architecture vLLM's pooling runner loads for Qwen2.5-Math-PRM), float32, on the same engine
settings in both servers: eager, no prefix caching (vLLM reads none for token classification
anyway), the same KV-cache size and context, every core bound to the engine's worker
(``VLLM_CPU_OMP_THREADS_BIND`` as referee's ``cpu_binding: spread`` gives its one engine).

Equal work: each system scores the same solutions (``--steps`` steps each) in requests of
``--batch`` solutions, ``--concurrency`` requests in flight. referee gets each solution as its list
of steps (``{"steps": [...]}``) and builds the model's input itself (chat template, steps as data,
the separator after each by id); vLLM gets those very token ids, built here beforehand, with the
separator's id as its ``pooler-config`` ``step_tag_id``, and answers the label probabilities at
each separator; a third measurement times vLLM with the client building those ids in the run (the
work referee's API process does for it). Both answers are checked to agree (1e-3 per step) before
anything is timed. Rounds alternate the order of the systems; every round's questions carry a tag
of their own.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_prm.py [--solutions 128 --rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))
from bench_throughput import start_server, stop_server  # noqa: E402

KV_BYTES = 1 << 26  # 64 MiB: the served tests' tiny-prm engine
MAX_LEN = 1024
CLIENT_BUILT = "vLLM /pooling, ids built by the client (timed)"


def solutions(n: int, steps: int, tag: str, seed: int) -> list[tuple[str, list[str]]]:
    """(question, steps) of n arithmetic solutions, each step a line of working."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        question = f"[{tag}] Problem {k}: what is {a} * {b}?"
        work, total = [], 0
        for i in range(steps):
            part = (b // steps) if i < steps - 1 else b - (b // steps) * (steps - 1)
            total += a * part
            work.append(f"Step {i + 1}: {a} * {part} = {a * part}, so far {total}.")
        out.append((question, work))
    return out


def token_ids(prompts, separator_id: int, question: str, steps: list[str]) -> list[int]:
    """The input referee's prm judge builds: the question as the user's turn, then each step as
    data followed by the separator token."""
    ids = list(prompts.chat_ids([{"role": "user", "content": question}], generation_prompt=True))
    for step in steps:
        ids += prompts.data_ids(step)
        ids.append(separator_id)
    return ids


async def run_referee(url: str, work, batch: int, concurrency: int) -> tuple[float, list[list[float]]]:
    chunks = [work[i : i + batch] for i in range(0, len(work), batch)]
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:

        async def one(chunk):
            body = {"judge": "prm", "items": [{"prompt": q, "response": {"steps": s}} for q, s in chunk]}
            async with gate:
                r = await http.post("/score", json=body)
            r.raise_for_status()
            results = r.json()["results"]
            if any(x["error"] for x in results):
                raise RuntimeError(f"referee: {[x['error'] for x in results if x['error']]}")
            return [x["step_scores"] for x in results]

        start = time.perf_counter()
        answers = await asyncio.gather(*[one(c) for c in chunks])
        return time.perf_counter() - start, [s for a in answers for s in a]


async def run_vllm(url: str, model: str, inputs, batch: int, concurrency: int, build=None):
    """``inputs``: token ids, or (with ``build``) solutions whose ids the client builds in the
    timed run, as a trainer calling vLLM directly must."""
    chunks = [inputs[i : i + batch] for i in range(0, len(inputs), batch)]
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:

        async def one(chunk):
            if build is not None:
                chunk = [build(q, s) for q, s in chunk]
            body = {"model": model, "input": chunk, "task": "token_classify"}
            async with gate:
                r = await http.post("/pooling", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"vLLM /pooling {r.status_code}: {r.text[:500]}")
            return [[row[1] for row in d["data"]] for d in r.json()["data"]]

        start = time.perf_counter()
        answers = await asyncio.gather(*[one(c) for c in chunks])
        return time.perf_counter() - start, [s for a in answers for s in a]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--solutions", type=int, default=128)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=8, help="solutions per request")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--port", type=int, default=18491, help="referee's; vLLM's server the next one")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/referee-bench-prm"))
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    from referee.embedded import ensure_embedded
    from reward_server.hardware import cpu_bind_for, cpu_info
    from reward_server.tokens import PromptTokenizer
    from tests.model_factory import PRM_SEPARATOR, make_tiny_prm

    model_dir = args.workdir / "tiny-prm"
    if not (model_dir / "config.json").exists():
        make_tiny_prm(model_dir, ensure_embedded("smollm2"))
    model = str(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = PromptTokenizer(tokenizer)
    separator_id = tokenizer.convert_tokens_to_ids(PRM_SEPARATOR)

    # Both engines on every core, as referee binds its one engine (cpu_binding spread).
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind_for(0, 1, "spread", cpu_info().cores) or "auto"
    vllm_port = args.port + 1
    vllm_url = f"http://127.0.0.1:{vllm_port}"
    vllm_cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
        "--host", "127.0.0.1", "--port", str(vllm_port), "--runner", "pooling", "--dtype", "float32",
        "--max-model-len", str(MAX_LEN), "--kv-cache-memory-bytes", str(KV_BYTES), "--enforce-eager",
        "--no-enable-prefix-caching", "--seed", "0",
        "--pooler-config", json.dumps({"step_tag_id": separator_id}),
    ]  # fmt: skip
    config = {
        "judges": [
            {
                "name": "prm",
                "kind": "prm",
                "model": model,
                "engine": {
                    "dtype": "float32",
                    "max_model_len": MAX_LEN,
                    "kv_cache_memory_gib": KV_BYTES / (1 << 30),
                },
            }
        ],
        "cache": {"enabled": False},
        "limits": {"max_inflight_engine_requests": 100_000, "max_items": 1024},
    }
    path = args.workdir / "prm.yaml"
    path.write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{args.port}"

    def work(tag: str, seed: int):
        w = solutions(args.solutions, args.steps, tag, seed)
        return w, [token_ids(prompts, separator_id, q, s) for q, s in w]

    procs = []
    seconds: dict[str, list[float]] = {"referee /score (prm)": [], "vLLM /pooling": [], CLIENT_BUILT: []}
    try:
        print("vLLM server: starting", flush=True)
        procs.append(start_server(vllm_cmd, args.workdir / "vllm-prm.log", vllm_url + "/health"))
        print("referee server: starting", flush=True)
        referee_cmd = [
            sys.executable,
            "-m",
            "referee.cli",
            "serve",
            "--config",
            str(path),
            "--port",
            str(args.port),
        ]
        procs.append(start_server(referee_cmd, args.workdir / "referee-prm.log", url + "/readyz"))
        # Agreement (and warm-up): the same solutions through both, step by step.
        w, ids = work("check", 1)
        _, ours = asyncio.run(run_referee(url, w[:16], args.batch, args.concurrency))
        _, theirs = asyncio.run(run_vllm(vllm_url, model, ids[:16], args.batch, args.concurrency))
        worst = max(abs(a - b) for x, y in zip(ours, theirs, strict=True) for a, b in zip(x, y, strict=True))
        if any(len(x) != args.steps for x in ours) or worst > 1e-3:
            raise SystemExit(f"referee and vLLM disagree: largest step difference {worst:.2e}")
        print(f"agreement: {16 * args.steps} steps, largest difference {worst:.1e}", flush=True)

        def build(question, steps):
            return token_ids(prompts, separator_id, question, steps)

        systems = {
            "referee /score (prm)": lambda w, ids: run_referee(url, w, args.batch, args.concurrency),
            "vLLM /pooling": lambda w, ids: run_vllm(vllm_url, model, ids, args.batch, args.concurrency),
            CLIENT_BUILT: lambda w, ids: run_vllm(vllm_url, model, w, args.batch, args.concurrency, build),
        }
        for r in range(args.rounds):
            names = list(systems) if r % 2 == 0 else list(reversed(systems))
            for k, name in enumerate(names):
                w, ids = work(f"round {r}, run {k}", 100 + r)
                elapsed = asyncio.run(systems[name](w, ids))[0]
                seconds[name].append(elapsed)
                print(f"round {r}: {name}: {args.solutions / elapsed:.1f} solutions/s", flush=True)
    finally:
        for proc in reversed(procs):
            stop_server(proc)
    base = statistics.median(seconds["vLLM /pooling"])
    print(
        f"\n{args.solutions} solutions x {args.steps} steps, {args.batch} per request, "
        f"{args.concurrency} in flight, {args.rounds} rounds, {cpu_info().cores} cores"
    )
    print("| system | solutions/s (median) | steps/s | vs vLLM /pooling |")
    print("| --- | --- | --- | --- |")
    for name, values in seconds.items():
        s = statistics.median(values)
        rate = args.solutions / s
        print(f"| {name} | {rate:.1f} | {rate * args.steps:.0f} | {base / s:.2f}x |")
    for other in ("vLLM /pooling", CLIENT_BUILT):
        paired = [v / r for r, v in zip(seconds["referee /score (prm)"], seconds[other], strict=True)]
        print(
            f"referee / {other} by round: "
            + ", ".join(f"{x:.2f}" for x in paired)
            + f"; median {statistics.median(paired):.2f}"
        )


if __name__ == "__main__":
    main()
