"""What the CPU build runs well: engine dtype and core binding, measured through referee's server.

Each configuration starts ``referee serve`` with its own judges file and environment, warms up, and
sends one closed-loop load (one item per request):

- dtype: the embedded SmolLM2-135M judge answering one-token pairwise verdicts in bfloat16 and in
  float32, on this processor as it is, and with torch and oneDNN held to AVX2
  (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``: the kernels an AVX2-only machine gets);
- cores: vLLM's default binding (``VLLM_CPU_OMP_THREADS_BIND=auto``: the worker on one core, the
  rest reserved) against every core, for one engine (pairwise verdicts) and for two engines in one
  server (the judge and a SmolLM2-backbone reward model under load at once), where ``spread`` puts
  them on disjoint cores.

All ratios compare configurations measured in the same run. Usage:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_cpu.py [--output BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_throughput import (  # noqa: E402
    closed_loop,
    load_rows,
    referee_payload,
    start_server,
    stop_server,
    write_section,
)

HEADING = "## CPU build: dtype and core binding"
BEGIN, END = "<!-- bench_cpu: begin (generated) -->", "<!-- bench_cpu: end -->"
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


@dataclass
class Config:
    section: str
    name: str
    dtype: str
    binding: str  # referee's cpu_binding policy
    judges: tuple[str, ...] = ("pairwise",)
    env: dict[str, str] = field(default_factory=dict)
    requests: int | None = None  # per workload; default --requests


@dataclass
class Result:
    config: Config
    items_per_s: dict[str, float]
    errors: int
    binds: list[str]


def configs(args) -> list[Config]:
    out = [
        Config("dtype", "bf16, native", "bfloat16", "vllm"),
        Config("dtype", "fp32, native", "float32", "vllm"),
        Config("dtype", "bf16, AVX2 kernels", "bfloat16", "vllm", env=AVX2, requests=args.slow_requests),
        Config("dtype", "fp32, AVX2 kernels", "float32", "vllm", env=AVX2),
    ]
    for dtype in args.core_dtypes:
        out += [
            Config("cores", f"1 engine, vllm default ({dtype})", dtype, "vllm"),
            Config("cores", f"1 engine, all cores ({dtype})", dtype, "all"),
            Config("cores", f"2 engines, vllm default ({dtype})", dtype, "vllm", ("pairwise", "score")),
            Config("cores", f"2 engines, all cores ({dtype})", dtype, "all", ("pairwise", "score")),
            Config("cores", f"2 engines, spread ({dtype})", dtype, "spread", ("pairwise", "score")),
        ]
    return [c for c in out if c.section in args.sections]


def run_config(cfg: Config, models: dict[str, str], data: list[dict], args) -> Result:
    names = {"pairwise": ("smollm2", "generative"), "score": ("rm", "classifier")}
    engine = {"dtype": cfg.dtype, "max_model_len": 2048}
    kv = {"pairwise": 1.0, "score": 0.5}
    config = {
        "cpu_binding": cfg.binding,
        "limits": {"max_inflight_engine_requests": 100_000},
        "judges": [
            {
                "name": names[w][0],
                "kind": names[w][1],
                "model": models[w],
                "engine": {**engine, "kv_cache_memory_gib": kv[w]},
            }
            for w in cfg.judges
        ],
    }
    path = args.workdir / "bench-cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    tag = "-avx2" if cfg.env else ""
    log = args.workdir / f"bench-cpu-{cfg.section}-{len(cfg.judges)}-{cfg.binding}-{cfg.dtype}{tag}.log"
    url = f"http://127.0.0.1:{args.port}"
    cmd = [sys.executable, *f"-m referee.cli serve --config {path} --port {args.port}".split()]
    saved = {k: os.environ.get(k) for k in cfg.env}
    os.environ.update(cfg.env)
    os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    try:
        proc = start_server(cmd, log, url + "/readyz")
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    try:
        payloads = {w: [referee_payload(w, r) for r in data] for w in cfg.judges}
        for w in cfg.judges:  # warm-up, each engine alone
            asyncio.run(closed_loop(url, payloads[w], 0, args.warmup, 4))
        n = cfg.requests or args.requests

        async def together():
            return await asyncio.gather(
                *[closed_loop(url, payloads[w], args.warmup, n, args.concurrency) for w in cfg.judges]
            )

        outs = asyncio.run(together())
        rates = {w: n / out[0] for w, out in zip(cfg.judges, outs, strict=True)}
        errors = sum(out[2] for out in outs)
    finally:
        stop_server(proc)
    lines = log.read_text().splitlines()
    binds = [line.split("core ids=")[1].strip() for line in lines if "core ids=" in line]
    result = Result(cfg, rates, errors, binds)
    print(f"  {cfg.section:5} {cfg.name:34} {rates}  errors {errors}  cores {binds}", flush=True)
    return result


def report(results: list[Result], args, command: str, minutes: float) -> str:
    import vllm

    from reward_server.hardware import cpu_info

    info = cpu_info()
    lines = [
        f"- command: `{command}` ({minutes:.0f} min)",
        f"- date: {dt.date.today().isoformat()}; machine: {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / (1 << 30):.0f} GiB, no GPU; vllm-cpu {vllm.__version__}; "
        f"{info.describe()}",
        f"- load: {args.concurrency} closed-loop clients per engine, one item per request, "
        f"{args.requests} requests per engine (bf16 on AVX2 kernels: {args.slow_requests}); pairwise = "
        "the embedded SmolLM2-135M judge, one-token A/B verdict on HH rows cut to "
        f"{args.max_chars} characters; score = a SmolLM2-135M-backbone reward model on (prompt, chosen). "
        "Two-engine rows load both engines at once.",
        "",
        "| section | configuration | worker cores (vLLM's log) | pairwise items/s | score items/s | errors |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in results:
        cells = [f"{r.items_per_s[w]:.2f}" if w in r.items_per_s else "" for w in ("pairwise", "score")]
        binds = " / ".join(r.binds) or "?"
        row = [r.config.section, r.config.name, binds, *cells, str(r.errors)]
        lines.append("| " + " | ".join(row) + " |")
    by = {r.config.name: r for r in results}

    def ratio(a: str, b: str, w: str = "pairwise") -> str:
        if a in by and b in by and w in by[a].items_per_s and w in by[b].items_per_s:
            return f"{by[a].items_per_s[w] / by[b].items_per_s[w]:.2f}x"
        return "n/a"

    lines += ["", "Ratios (same run):"]
    lines.append(f"- fp32 / bf16 with native bf16: {ratio('fp32, native', 'bf16, native')}")
    lines.append(f"- fp32 / bf16 on AVX2 kernels: {ratio('fp32, AVX2 kernels', 'bf16, AVX2 kernels')}")
    for d in args.core_dtypes:
        lines.append(
            f"- {d}, one engine, all cores / vLLM default: "
            f"{ratio(f'1 engine, all cores ({d})', f'1 engine, vllm default ({d})')}"
        )
        for w in ("pairwise", "score"):
            for pol in ("all cores", "spread"):
                lines.append(
                    f"- {d}, two engines, {w}, {pol} / vLLM default: "
                    f"{ratio(f'2 engines, {pol} ({d})', f'2 engines, vllm default ({d})', w)}"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default="dtype,cores")
    p.add_argument("--core-dtypes", default="float32", help="dtypes to run the core comparison in")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--slow-requests", type=int, default=32, help="requests for bf16 on AVX2 kernels")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--max-chars", type=int, default=1000)
    p.add_argument("--port", type=int, default=18451)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/referee-bench"))
    p.add_argument("--output", type=Path)
    args = p.parse_args()
    args.sections = args.sections.split(",")
    args.core_dtypes = args.core_dtypes.split(",")
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ["HF_HUB_OFFLINE"] = "1"

    from referee.embedded import ensure_embedded
    from tests.model_factory import make_backbone_classifier

    judge_dir = ensure_embedded("smollm2")
    rm_dir = make_backbone_classifier(judge_dir.parent / "bench-smollm2-rm", judge_dir)
    models = {"pairwise": str(judge_dir), "score": str(rm_dir)}
    data = load_rows(args.max_chars)
    started = time.monotonic()
    results = [run_config(c, models, data, args) for c in configs(args)]
    command = " ".join(["HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_cpu.py", *sys.argv[1:]])
    body = report(results, args, command, (time.monotonic() - started) / 60)
    print("\n" + body)
    if args.output:
        write_section(args.output, body, HEADING, BEGIN, END)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
