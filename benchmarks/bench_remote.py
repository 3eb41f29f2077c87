"""Remote judges: referee over a remote vLLM server against referee in process against the
Pref-GRPO client pattern straight to the same vLLM server, on the same groups, in one run.

The groups are bench_groups' (8 policy completions per MT-Bench prompt, sampled once and kept in
its workdir). The judge is the embedded SmolLM2 on the same engine settings everywhere: referee's
in-process engine, and ``vllm serve`` (the CPU build here) which both referee's remote judge and the
pattern call. Equal work: every system judges each group's 28 pairs in one order with one-token
logprob verdicts; referee also in both orders (its default). Rounds alternate the systems so the
machine's drift falls on all of them.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_remote.py [--groups 8 --rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_groups import resolve_dtype, run_pattern, run_referee, sample_groups  # noqa: E402
from bench_throughput import start_server, stop_server  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--port", type=int, default=18481, help="referee's; vLLM's server the next one")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/referee-bench-groups"))
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    from referee.embedded import ensure_embedded

    model = str(ensure_embedded("smollm2"))
    groups = sample_groups(model, args.groups, args.workdir / "groups.jsonl")[: args.groups]
    dtype = resolve_dtype("auto")[0]
    step = 256  # referee's CPU step budget for generative judges, given to vLLM's server too
    engine = {
        "dtype": dtype,
        "max_model_len": 2048,
        "kv_cache_memory_gib": 1.0,
        "max_num_batched_tokens": step,
    }
    vllm_port = args.port + 1
    vllm_cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
        "--host", "127.0.0.1", "--port", str(vllm_port), "--seed", "0", "--dtype", dtype,
        "--max-model-len", "2048", "--kv-cache-memory-bytes", str(1 << 30), "--enforce-eager",
        "--enable-prefix-caching", "--scheduling-policy", "priority", "--max-num-batched-tokens", str(step),
    ]  # fmt: skip
    vllm_url = f"http://127.0.0.1:{vllm_port}"
    # vLLM's server on every core, as referee binds its one in-process engine (cpu_binding spread):
    # vLLM's own default puts its worker on one core and leaves the rest to its API process.
    from reward_server.hardware import cpu_bind_for, cpu_info

    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind_for(0, 1, "spread", cpu_info().cores) or "auto"
    config = {
        "judges": [
            {"name": "local", "kind": "generative", "model": "embedded:smollm2", "engine": engine},
            {
                "name": "remote",
                "kind": "generative",
                "model": "embedded:smollm2",
                "engine": {"remote": {"urls": [vllm_url], "served_model": model, "priorities": True}},
            },
        ],
        "cache": {"enabled": False},
        "limits": {"max_inflight_engine_requests": 100_000},
    }
    path = args.workdir / "remote.yaml"
    path.write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{args.port}"
    print("vLLM server: starting", flush=True)
    vllm = start_server(vllm_cmd, args.workdir / "vllm-remote.log", vllm_url + "/health")
    procs = [vllm]
    seconds: dict[str, list[float]] = {}
    try:
        print("referee server (in process and remote judges): starting", flush=True)
        procs.append(
            start_server(
                [
                    sys.executable,
                    "-m",
                    "referee.cli",
                    "serve",
                    "--config",
                    str(path),
                    "--port",
                    str(args.port),
                ],
                args.workdir / "referee-remote.log",
                url + "/readyz",
            )
        )

        def tagged(tag: str) -> list[dict]:
            # A tag of its own at the start of every prompt of a measurement: no measurement reads
            # another's prompts from vLLM's prefix cache (the pattern's chat prompts tokenise as
            # referee's do), while a group's comparisons still share their prefix.
            return [{**g, "prompt": f"[{tag}] {g['prompt']}"} for g in groups]

        def referee(judge: str, order: str):
            return lambda tag: run_referee(url, tagged(tag), {"judge": judge, "order": order}, 8)

        systems = {
            "referee in process, one order": referee("local", "single"),
            "referee remote, one order": referee("remote", "single"),
            "pattern straight to vLLM (one order)": lambda tag: run_pattern(vllm_url, model, tagged(tag)),
            "referee in process, both orders": referee("local", "both"),
            "referee remote, both orders": referee("remote", "both"),
        }
        asyncio.run(run_referee(url, groups[:1], {"judge": "local"}, 1))  # warm-up
        asyncio.run(run_referee(url, groups[:1], {"judge": "remote"}, 1))
        for r in range(args.rounds):
            names = list(systems) if r % 2 == 0 else list(reversed(systems))
            for k, name in enumerate(names):
                elapsed = asyncio.run(systems[name](f"round {r}, run {k}"))[0]
                seconds.setdefault(name, []).append(elapsed)
                print(f"round {r}: {name}: {len(groups) / elapsed:.3f} groups/s", flush=True)
    finally:
        for proc in reversed(procs):
            stop_server(proc)
    base = statistics.median(seconds["referee in process, one order"])
    print("| system | groups/s (median) | vs referee in process, one order |")
    print("| --- | --- | --- |")
    for name, values in seconds.items():
        s = statistics.median(values)
        print(f"| {name} | {len(groups) / s:.3f} | {base / s:.2f}x |")


if __name__ == "__main__":
    main()
