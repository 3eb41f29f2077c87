"""Group win rates on text: referee's schedules against the Pref-GRPO client pattern.

Groups are real policy samples: 8 completions per MT-Bench prompt, sampled from the embedded
SmolLM2-135M-Instruct (temperature 1, 64 tokens) with vLLM's offline engine, kept in the workdir.
The judge is the same SmolLM2 model, a one-token A/B verdict with its log-probabilities, served by
referee and by vLLM's own OpenAI-compatible server with the same engine settings.

Reference: the full round robin in both orders (56 engine requests per group of 8). For every
other schedule: groups/s, engine requests per group, and Kendall's tau-b between its win rates and
the reference's, averaged over the groups (ties in either ranking count as in tau-b). Schedules:
- full round robin, one order (28 requests): the pattern's work, position bias included;
- ``opponents=k`` (a circulant schedule, 8k/2 pairs) in both orders, win rates observed (Pref-GRPO)
  or estimated with a Bradley-Terry fit (``estimate=bradley_terry``);
- the pattern: one chat request per unordered pair (single order, 28 per group), 16 client
  threads, against vLLM's server.

Also reported: the duplicate rate of the sampled completions (identical completions in a group are
judged once by the judgment cache).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_groups.py [--groups 12]

``--judges FILE`` (a judges file in the server's config format) replaces the judges: its first
generative judge answers the schedules (and is the model vLLM's server runs for the pattern), its
first classifier judge the classifier comparison (skipped if the file has none); engine settings
are the file's, with prefix caching off for the same reason as above. The groups are still sampled
from the embedded SmolLM2 policy. Results go to a section of their own, named after the file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "services"))

from bench_throughput import start_server, stop_server, write_section  # noqa: E402
from judges_file import cli_args, engine_kwargs, model_path, pick, read_judges, with_engine  # noqa: E402

HEADING = "## Text groups: win-rate schedules against the Pref-GRPO client pattern"
BEGIN, END = "<!-- bench_groups:begin -->", "<!-- bench_groups:end -->"
PROMPTS = REPO.parent / "shared" / "data" / "mt_bench_prompts.jsonl"
GROUP = 8
# Prefix caching off in both servers: the schedules run one after the other on the same groups, and
# a warm prefix cache would favour whichever ran later.
ENGINE = {
    "dtype": "auto",
    "max_model_len": 2048,
    "kv_cache_memory_gib": 1.0,
    "enforce_eager": True,
    "enable_prefix_caching": False,
}


def sample_groups(model: str, n: int, out: Path) -> list[dict]:
    if out.exists():
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        if len(rows) >= n:
            return rows[:n]
    from vllm import LLM, SamplingParams

    prompts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()][:n]
    llm = LLM(
        model=model, dtype="auto", max_model_len=2048, enforce_eager=True, gpu_memory_utilization=0.15, seed=0
    )
    params = SamplingParams(n=GROUP, temperature=1.0, top_p=0.95, max_tokens=64)  # the engine seed: 0
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    rows = [
        {"prompt": p, "responses": [c.text for c in o.outputs]} for p, o in zip(prompts, outs, strict=True)
    ]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def kendall_tau_b(x: list[float], y: list[float]) -> float | None:
    concordant = discordant = ties_x = ties_y = 0
    n = len(x)
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denom = ((concordant + discordant + ties_x) * (concordant + discordant + ties_y)) ** 0.5
    return (concordant - discordant) / denom if denom else None  # a ranking without order: undefined


async def run_referee(
    url: str, groups: list[dict], options: dict, concurrency: int = 4
) -> tuple[float, list, int]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=900) as http:

        async def one(g):
            async with sem:
                body = {"prompt": g["prompt"], "responses": g["responses"], "cache": False, **options}
                r = await http.post("/winrate", json=body)
                r.raise_for_status()
                return r.json()

        start = time.perf_counter()
        answers = await asyncio.gather(*[one(g) for g in groups])
        elapsed = time.perf_counter() - start
    rates = [[w if w is not None else 0.5 for w in a["win_rates"]] for a in answers]
    return elapsed, rates, answers[0]["usage"]["engine_requests"] + answers[0]["usage"]["cached"], answers


async def run_pattern(url: str, model: str, groups: list[dict]) -> tuple[float, list]:
    from reward_server import templates  # the same verdict prompt as referee's logprob mode

    sem = asyncio.Semaphore(16)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=httpx.Limits(max_connections=16)) as http:

        async def pair(g, i, j):
            messages = templates.pairwise_logprob(g["prompt"], g["responses"][i], g["responses"][j], None)
            body = {
                "model": model,
                "messages": messages,
                "max_tokens": 1,
                "logprobs": True,
                "top_logprobs": 20,
                "temperature": 0,
            }
            async with sem:
                r = await http.post("/v1/chat/completions", json=body)
            r.raise_for_status()
            top = r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            pa = sum(2.718281828 ** t["logprob"] for t in top if t["token"].strip() == "A")
            pb = sum(2.718281828 ** t["logprob"] for t in top if t["token"].strip() == "B")
            return i, j, (pa / (pa + pb) if pa + pb else 0.5)

        start = time.perf_counter()
        jobs = [pair(g, i, j) for g in groups for i in range(GROUP) for j in range(i + 1, GROUP)]
        results = await asyncio.gather(*jobs)
        elapsed = time.perf_counter() - start
    rates, k = [], 0
    for _ in groups:
        credit = [[] for _ in range(GROUP)]
        for i, j, p in results[k : k + 28]:
            c = 1.0 if p > 0.5 else 0.0 if p < 0.5 else 0.5
            credit[i].append(c)
            credit[j].append(1 - c)
        k += 28
        rates.append([sum(c) / len(c) for c in credit])
    return elapsed, rates


async def run_naive_pairs(url: str, groups: list[dict], rm: str = "rm") -> float:
    sem = asyncio.Semaphore(16)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=httpx.Limits(max_connections=16)) as http:

        async def pair(g, i, j):
            item = {"prompt": g["prompt"], "response_a": g["responses"][i], "response_b": g["responses"][j]}
            async with sem:
                r = await http.post("/pairwise", json={"judge": rm, "cache": False, "items": [item]})
            r.raise_for_status()

        start = time.perf_counter()
        await asyncio.gather(
            *[pair(g, i, j) for g in groups for i in range(GROUP) for j in range(i + 1, GROUP)]
        )
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=12)
    parser.add_argument("--port", type=int, default=8941)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/referee-bench-groups"))
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--judges", type=Path, help="a judges file (server config format): its first "
                        "generative and classifier judges replace the CPU models")  # fmt: skip
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from referee.embedded import ensure_embedded

    model = str(ensure_embedded("smollm2"))
    groups = sample_groups(model, args.groups, args.workdir / "groups.jsonl")
    duplicates = sum(GROUP - len(set(g["responses"])) for g in groups) / (GROUP * len(groups))

    if args.judges:
        judges = read_judges(args.judges)
        gen, cls = pick(judges, "generative"), pick(judges, "classifier")
        if gen is None:
            raise SystemExit(f"{args.judges} has no generative judge")
        off = {"enable_prefix_caching": False}
        judge_cfgs = [with_engine(j, **off) for j in (gen, cls) if j is not None]
        model, judge_name, rm_name = model_path(gen), gen["name"], cls and cls["name"]
        vllm_engine = engine_kwargs(judge_cfgs[0])
    else:
        from tests.model_factory import make_backbone_classifier

        rm = str(make_backbone_classifier(args.workdir / "smollm2-rm", Path(model)))
        rm_engine = {**ENGINE, "kv_cache_memory_gib": 0.5}
        judge_cfgs = [
            {"name": "judge", "kind": "generative", "model": model, "engine": ENGINE},
            {"name": "rm", "kind": "classifier", "model": rm, "engine": rm_engine},
        ]
        judge_name, rm_name = "judge", "rm"
        vllm_engine = None
    config = {
        "judges": judge_cfgs,
        "default_judge": judge_name,
        "limits": {"max_inflight": 100_000, "max_request_cost": 100_000},
    }
    path = args.workdir / "referee.yaml"
    path.write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{args.port}"
    cmd = [sys.executable, "-m", "referee.cli", "serve", "--config", str(path), "--port", str(args.port)]
    schedules = [
        ("full round robin, order=both (reference)", {"order": "both"}),
        ("full round robin, order=single", {"order": "single"}),
        *[(f"opponents={k}, order=both", {"order": "both", "opponents": k}) for k in (2, 3, 4)],
    ]
    results: list[tuple[str, float, int, list]] = []
    print("referee: starting", flush=True)
    proc = start_server(cmd, args.workdir / "referee.log", url + "/readyz")
    try:
        asyncio.run(run_referee(url, groups[:1], {"order": "single"}))  # warm-up
        for name, options in schedules:
            elapsed, rates, requests, answers = asyncio.run(run_referee(url, groups, options))
            results.append(
                (f"{name}, observed" if "opponents" in options else name, elapsed, requests, rates)
            )
            if "opponents" in options:  # Bradley-Terry estimates from the very same comparisons
                from referee.rewards import bradley_terry_win_rates

                fitted = [
                    [w if w is not None else 0.5 for w in bradley_terry_win_rates(a["win_matrix"])]
                    for a in answers
                ]
                results.append((f"{name}, estimate=bradley_terry", elapsed, requests, fitted))
            print(f"{name}: {len(groups) / elapsed:.3f} groups/s", flush=True)
        # A classifier judge: one /winrate (N scores, Bradley-Terry on them) against the naive client
        # that asks /pairwise for each of the 28 pairs (2 scores each), 16 at a time.
        classifier = None
        if rm_name:
            asyncio.run(run_referee(url, groups[:1], {"judge": rm_name}))
            on_elapsed, _, on_requests, _ = asyncio.run(run_referee(url, groups, {"judge": rm_name}))
            naive_elapsed = asyncio.run(run_naive_pairs(url, groups, rm_name))
            classifier = (on_elapsed, on_requests, naive_elapsed)
    finally:
        stop_server(proc)

    port = args.port + 1
    opts = (
        f"--host 127.0.0.1 --port {port} --dtype auto --enforce-eager --seed 0 --max-model-len 2048 "
        f"--kv-cache-memory-bytes {1 << 30} --no-enable-prefix-caching"
    )
    if vllm_engine is not None:  # --judges: the file's engine settings, as referee ran them
        opts = f"--host 127.0.0.1 --port {port} --seed 0 --no-enable-prefix-caching"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *opts.split()]
    cmd += cli_args(vllm_engine or {})
    print("vLLM server: starting", flush=True)
    proc = start_server(cmd, args.workdir / "vllm.log", f"http://127.0.0.1:{port}/health")
    try:
        asyncio.run(run_pattern(f"http://127.0.0.1:{port}", model, groups[:1]))
        elapsed, rates = asyncio.run(run_pattern(f"http://127.0.0.1:{port}", model, groups))
        results.append(
            ("Pref-GRPO pattern: 28 chat calls per group, 16 threads, vLLM server", elapsed, 28, rates)
        )
    finally:
        stop_server(proc)

    reference = results[0][3]
    pattern_gps = len(groups) / results[-1][1]
    lines = [
        f"Command: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_groups.py --groups {args.groups}` "
        f"({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores; {args.groups} MT-Bench prompts x {GROUP} "
        "SmolLM2 samples; SmolLM2 judge, one-token verdicts; judgment cache and prefix caching off; "
        "Bradley-Terry rows: the same comparisons as the row above, fitted). Duplicate completions "
        f"in these groups: {duplicates:.1%}.",
        "",
        "| schedule | engine requests / group | groups/s | × pattern | Kendall τ vs reference |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, elapsed, requests, rates in results:
        gps = len(groups) / elapsed
        taus = [
            t for r, ref in zip(rates, reference, strict=True) if (t := kendall_tau_b(r, ref)) is not None
        ]
        tau = f"{sum(taus) / len(taus):.3f} ({len(taus)} groups)" if taus else "undefined"
        lines.append(f"| {name} | {requests} | {gps:.3f} | {gps / pattern_gps:.2f} | {tau} |")
    if classifier is not None:
        on_elapsed, on_requests, naive_elapsed = classifier
        what = f"`{rm_name}`" if args.judges else "SmolLM2 backbone, random scalar head"
        lines += [
            "",
            f"Classifier judge ({what}), the same {args.groups} groups: one "
            f"`/winrate` per group ({on_requests} engine requests: N scores) took {on_elapsed:.2f} s; the "
            f"naive client's 28 `/pairwise` calls per group (56 engine requests, 16 at a time) took "
            f"{naive_elapsed:.2f} s: **{on_elapsed / naive_elapsed:.2f}** of the time.",
        ]
    if args.judges:
        cmd = " ".join(["HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_groups.py", *sys.argv[1:]])
        who = ", ".join(f"`{j['name']}` = {j['model']}" for j in judge_cfgs)
        lines[0] = (
            f"Command: `{cmd}` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores; {args.groups} MT-Bench "
            f"prompts x {GROUP} SmolLM2 samples; judges from `{args.judges}`: {who}; judgment cache and "
            "prefix caching off)."
        )
        tag = f"bench_groups --judges {args.judges.name}"
        heading = f"{HEADING} (judges file {args.judges.name})"
        write_section(args.output, "\n".join(lines), heading, f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->")
    else:
        write_section(args.output, "\n".join(lines), HEADING, BEGIN, END)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
