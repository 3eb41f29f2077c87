"""Group win rates on text: referee's schedules against the Pref-GRPO client pattern.

Groups are real policy samples: 8 completions per MT-Bench prompt, sampled from the embedded
SmolLM2-135M-Instruct (temperature 1, 64 tokens) with vLLM's offline engine, kept in the workdir.
The judge is the same SmolLM2 model, a one-token A/B verdict with its log-probabilities, served by
referee and by vLLM's own OpenAI-compatible server with the same engine settings.

Reference: the full round robin in both orders (56 engine requests per group of 8), pairs whose
verdict flips with the order decided by ``--inconsistent`` (default ``average``: the mean of the two
orders' P(A), so a position-biased judge still ranks by what is left after the bias; with ``tie``
such a judge's reference is all ties and rank agreement is undefined). For every other schedule:
groups/s, engine requests per group, the share of comparisons without a valid verdict, and Kendall's
tau-b between its win rates and the reference's, averaged over the groups (ties in either ranking
count as in tau-b). Schedules:
- full round robin, one order (28 requests): the pattern's work, position bias included;
- ``opponents=k`` (a circulant schedule, 8k/2 pairs) in both orders, win rates observed (Pref-GRPO)
  or estimated with a Bradley-Terry fit (``estimate=bradley_terry``);
- ``schedule=listwise`` in both orders: the judge sees the whole group and writes a ranking
  (2 generations per group);
- the pattern: one chat request per unordered pair (single order, 28 per group), 16 client
  threads, against vLLM's server.

Also reported: the duplicate rate of the sampled completions. ``--duplicate-rate R`` (the rate a
training run measured: the trainer writes it to its summary.json) adds rows with the judgment cache
on, on copies of the groups in which that share of the completions repeat another of their group
(identical completions of a group are judged once, and a pair of identical ones is a tie without
the judge).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_groups.py [--groups 12] [--duplicate-rate R]

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
    # vLLM's own default step, as its server runs below: this compares schedules' throughput (the
    # CPU build's smaller default step trades some of it for fairness between jobs).
    "max_num_batched_tokens": 2048,
}


def resolve_dtype(requested: str) -> tuple[str, str]:
    """referee's dtype rule (``auto`` is float32 on a CPU without native bf16, where vLLM's own
    ``auto`` would take the model's bfloat16 and run it emulated, tens of times slower): the offline
    sampler and vLLM's server get the same concrete dtype as referee's judges."""
    from reward_server.hardware import resolve_dtype as rule

    return rule(requested)


def sample_groups(model: str, n: int, out: Path) -> list[dict]:
    if out.exists():
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        if len(rows) >= n:
            return rows[:n]
    from vllm import LLM, SamplingParams

    prompts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()][:n]
    llm = LLM(
        model=model,
        dtype=resolve_dtype("auto")[0],
        max_model_len=2048,
        enforce_eager=True,
        gpu_memory_utilization=0.15,
        seed=0,
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


def with_duplicates(groups: list[dict], rate: float) -> list[dict]:
    """Copies of the groups in which round(rate * size) completions (the last ones) repeat one of
    the others (deterministic): what a policy that repeats itself sends."""
    out = []
    for g in groups:
        responses = list(g["responses"])
        n = len(responses)
        repeats = min(round(rate * n), n - 1)
        for k in range(repeats):
            responses[n - 1 - k] = responses[(3 * k) % (n - repeats)]
        out.append({**g, "responses": responses})
    return out


async def run_referee(
    url: str, groups: list[dict], options: dict, concurrency: int = 4
) -> tuple[float, list, int, list]:
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
            return i, j, (pa / (pa + pb) if pa + pb else None)

        start = time.perf_counter()
        jobs = [pair(g, i, j) for g in groups for i in range(GROUP) for j in range(i + 1, GROUP)]
        results = await asyncio.gather(*jobs)
        elapsed = time.perf_counter() - start
    rates, k = [], 0
    for _ in groups:
        credit = [[] for _ in range(GROUP)]
        for i, j, p in results[k : k + 28]:
            if p is None:  # neither label among the top log-probabilities: no verdict
                continue
            c = 1.0 if p > 0.5 else 0.0 if p < 0.5 else 0.5
            credit[i].append(c)
            credit[j].append(1 - c)
        k += 28
        rates.append([sum(c) / len(c) if c else 0.5 for c in credit])
    invalid = sum(1 for *_, p in results if p is None) / len(results)
    return elapsed, rates, invalid


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
    parser.add_argument("--opponents", default="2,3,4", help="sparse schedules: opponents per response")
    parser.add_argument(
        "--inconsistent",
        choices=["average", "tie"],
        default="average",
        help="the rule for pairs whose verdict flips with the order (both orders)",
    )
    parser.add_argument(
        "--duplicate-rate",
        type=float,
        default=0.0,
        help="add rows with the judgment cache on, on groups with this share of "
        "repeated completions (a training run's summary.json duplicate_rate)",
    )
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
        "limits": {"max_inflight_engine_requests": 100_000, "max_request_cost": 100_000},
    }
    path = args.workdir / "referee.yaml"
    path.write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{args.port}"
    cmd = [sys.executable, "-m", "referee.cli", "serve", "--config", str(path), "--port", str(args.port)]
    both = {"order": "both", "inconsistent": args.inconsistent}
    opponents = [int(k) for k in args.opponents.split(",")]
    schedules = [
        ("full round robin, order=both (reference)", both),
        ("full round robin, order=single", {"order": "single"}),
        *[(f"opponents={k}, order=both", {**both, "opponents": k}) for k in opponents],
        ("schedule=listwise, order=both", {**both, "schedule": "listwise"}),
    ]
    dup_groups = with_duplicates(groups, args.duplicate_rate) if args.duplicate_rate > 0 else None
    if dup_groups is not None:
        dup_share = sum(GROUP - len(set(g["responses"])) for g in dup_groups) / (GROUP * len(groups))
        # One row: a second would find the first one's comparisons in the cache.
        name = f"full round robin, order=both, cache on, {dup_share:.0%} repeated"
        schedules.append((name, {**both, "cache": True}))
    results: list[tuple[str, float, float, list, float]] = []
    print("referee: starting", flush=True)
    proc = start_server(cmd, args.workdir / "referee.log", url + "/readyz")
    try:
        asyncio.run(run_referee(url, groups[:1], {"order": "single"}))  # warm-up
        for name, options in schedules:
            on = dup_groups if options.get("cache") else groups
            elapsed, rates, _, answers = asyncio.run(run_referee(url, on, options))
            requests = sum(a["usage"]["engine_requests"] for a in answers) / len(answers)
            pairs = sum(a["comparisons"] for a in answers)
            invalid = sum(a["invalid"] for a in answers) / pairs if pairs else 0.0
            observed = f"{name}, observed" if "opponents" in options else name
            results.append((observed, elapsed, requests, rates, invalid))
            if "opponents" in options:  # Bradley-Terry estimates from the very same comparisons
                from referee.rewards import bradley_terry_win_rates

                fitted = [
                    [w if w is not None else 0.5 for w in bradley_terry_win_rates(a["win_matrix"])]
                    for a in answers
                ]
                results.append((f"{name}, estimate=bradley_terry", elapsed, requests, fitted, invalid))
            print(f"{name}: {len(groups) / elapsed:.3f} groups/s, invalid {invalid:.1%}", flush=True)
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
    dtype = resolve_dtype("auto")[0]
    opts = (
        f"--host 127.0.0.1 --port {port} --dtype {dtype} --enforce-eager --seed 0 --max-model-len 2048 "
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
        elapsed, rates, invalid = asyncio.run(run_pattern(f"http://127.0.0.1:{port}", model, groups))
        results.append(
            (
                "Pref-GRPO pattern: 28 chat calls per group, 16 threads, vLLM server",
                elapsed,
                28,
                rates,
                invalid,
            )
        )
    finally:
        stop_server(proc)

    reference = results[0][3]
    pattern_gps = len(groups) / results[-1][1]
    command = " ".join(["HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_groups.py", *sys.argv[1:]])
    lines = [
        f"Command: `{command}` "
        f"({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores; {args.groups} MT-Bench prompts x {GROUP} "
        "SmolLM2 samples; SmolLM2 judge, one-token verdicts (listwise: a generated ranking); "
        f"inconsistent={args.inconsistent}; judgment cache off unless the row says so, prefix caching "
        "off; Bradley-Terry rows: the same comparisons as the row above, fitted). Duplicate completions "
        f"in these groups: {duplicates:.1%}.",
        "",
        "| schedule | engine requests / group | groups/s | × pattern | invalid comparisons | "
        "Kendall τ vs reference |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, elapsed, requests, rates, invalid in results:
        gps = len(groups) / elapsed
        taus = [
            t for r, ref in zip(rates, reference, strict=True) if (t := kendall_tau_b(r, ref)) is not None
        ]
        tau = f"{sum(taus) / len(taus):.3f} ({len(taus)} groups)" if taus else "undefined"
        if "repeated" in name:  # other groups than the reference's: rank agreement is not comparable
            tau = "-"
        lines.append(
            f"| {name} | {requests:g} | {gps:.3f} | {gps / pattern_gps:.2f} | {invalid:.1%} | {tau} |"
        )
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
        cmd = command
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
