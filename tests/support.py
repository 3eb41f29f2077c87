"""What the test modules share, in one place: paths and the test servers' settings, starting and
stopping a server, the scripted engine that stands in for vLLM, counting a client's tries, tenants
files and a throwaway Redis, the docs' tested blocks. Fixtures stay in ``conftest.py``; test modules
import from here, never from one another or from the conftest."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis as redis_sync
import yaml

from referee.auth import hash_key, new_key
from reward_server.engine import Completion, Engine
from reward_server.tokens import PromptTokenizer

# ---------------------------------------------------------------- paths and the test servers' settings

REPO = Path(__file__).resolve().parent.parent  # tests/support.py: the repository
SHARED_DATA = REPO.parent / "shared" / "data"
TEST_DATA = REPO / "tests" / "data"  # files shipped with the tests
READY_TIMEOUT_S = 600

# Limits small enough for the tests to reach them with small requests.
TEST_LIMITS = {
    "max_items": 64,
    "max_group_size": 16,
    "max_text_chars": 20_000,
    "max_request_chars": 300_000,
    "max_inflight_engine_requests": 160,
    "max_waiting_engine_requests": 80,
    "max_admission_wait_s": 300,
    "max_retries": 2,
    "max_new_tokens": 256,
    "max_body_bytes": 1 << 20,
    "max_request_cost": 400,
}


# The shared servers answer the same questions for many tests, which count engine requests or make
# requests overlap: their judgment cache is on, but used only by requests that ask ("cache": true).
TEST_CACHE = {"default": False}

# Image limits small enough to reach with small files.
TEST_MEDIA = {
    "max_image_bytes": 200_000,
    "max_image_pixels": 1_000_000,
    "max_request_pixels": 3_000_000,
    "max_images": 12,
    "blob_ttl_s": 600,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
# Queue settings that make recovery observable within seconds.
TEST_QUEUE = {"reclaim_idle_s": 3.0, "reclaim_every_s": 0.5, "max_deliveries": 2, "block_ms": 50}


# ---------------------------------------------------------------- the shared test server


def native_bf16() -> bool:
    from reward_server.hardware import cpu_info

    return cpu_info().native_bf16


def served_judges() -> set[str]:
    """The judges the shared test server loads on this machine."""
    return {
        "smollm2",
        "tiny-rm",
        "followup",
        "tiny-objectives",
        "tiny-prm",
        "panel",
        "panel-pointwise",
        *(["tiny-rm-bf16"] if native_bf16() else []),
    }


def start_server(config: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    """Start ``referee serve`` in its own process group and wait until its judges are ready."""
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("REFEREE_CONFIG", None)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "referee.cli", "serve", "--config", str(config), "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            pytest.fail(f"the server was not ready after {READY_TIMEOUT_S}s:\n{log_path.read_text()[-4000:]}")
        time.sleep(1)


def stop_server(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a server and its engine processes (the whole process group)."""
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=60)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with contextlib.suppress(ProcessLookupError):  # engine processes left behind by a killed server
        os.killpg(proc.pid, signal.SIGKILL)


# ---------------------------------------------------------------- a scripted engine instead of vLLM


@functools.cache
def load_tokenizer(model_dir: Path | str):
    """A model's tokenizer, loaded once a session (a second each): the scripted engines and the
    tests only read it. A test that changes a tokenizer (its chat template) loads its own."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


_PROMPTS: dict[int, PromptTokenizer] = {}


def _prompts_for(tokenizer) -> PromptTokenizer:
    """One ``PromptTokenizer`` per tokenizer, as one real engine keeps for its life: building one
    copies the tokenizer (a third of a second), and each test makes new scripted engines."""
    built = _PROMPTS.get(id(tokenizer))
    if built is None or built.tokenizer is not tokenizer:
        built = _PROMPTS[id(tokenizer)] = PromptTokenizer(tokenizer)
    return built


QUESTION = "What is the capital of France?"
# Responses named so that the scripted engine can tell which one the judge is shown first.
RESPONSES = ["Paris alpha.", "Lyon bravo.", "Nice charlie.", "Rome delta."]


def _name(text: str) -> str:
    return text.split()[-1].rstrip(".")


class ScriptedEngine(Engine):
    """The real Engine's tokenisation; next-token probabilities and logits from a script."""

    def __init__(self, tokenizer, runner: str) -> None:
        self._llm = None
        self._priorities = False
        self.tokenizer = tokenizer
        self._prompts = _prompts_for(tokenizer)
        self.model_path = "scripted"
        self.runner = runner
        self.max_model_len = 1 << 20
        self.dtype = "float32"
        # pairwise: (first shown, second shown) -> {label: probability}; default below
        self.pairs: dict[tuple[str, str], dict[str, float]] = {}
        self.default_pair = {"A": 0.6, "B": 0.4}
        self.ratings: dict[str, dict[str, float]] = {}  # response name -> {label: probability}
        self.logits: dict[str, float] = {}  # response name -> classifier logit
        self.activations: list[bool] = []

    def _shown(self, prompt: str) -> list[str]:
        found = [(prompt.find(_name(r)), _name(r)) for r in RESPONSES if _name(r) in prompt]
        return [name for _, name in sorted(found)]

    async def complete(
        self, token_ids, *, max_tokens, temperature=0.0, top_logprobs=None, seed=None, priority=0
    ):
        prompt = self.tokenizer.decode(token_ids)
        shown = self._shown(prompt)
        if "RESPONSE A" in prompt:
            probs = self.pairs.get((shown[0], shown[1]), self.default_pair)
        else:
            probs = self.ratings.get(shown[0], {"7": 1.0})
        probs = {**probs, "The": max(0.0, 1.0 - sum(probs.values()))}  # the rest: not a label
        logprobs = {
            self.tokenizer.encode(k, add_special_tokens=False)[0]: math.log(p) for k, p in probs.items() if p
        }
        return Completion(
            text=max(probs, key=probs.get),
            first_token_logprobs=logprobs,
            prompt_tokens=len(token_ids),
            completion_tokens=1,
            finish_reason="stop",
        )

    async def classify(self, token_ids, *, activation=False, priority=0) -> float:
        self.activations.append(activation)
        text = self.tokenizer.decode(token_ids)
        logit = self.logits[self._shown(text)[0]]
        return 1.0 / (1.0 + math.exp(-logit)) if activation else logit

    def shutdown(self) -> None:
        pass


# ---------------------------------------------------------------- counting tries instead of timing them


class Tries:
    """Counts the calls of one async method of an object, which still runs: a test asserts how many
    times a client tried (at once, retried, gave up) instead of how many seconds it took.
    ``answered`` is set once a try has returned or raised, for a test that acts only after that."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, obj: object, name: str) -> None:
        self.count = 0
        self.answered = asyncio.Event()
        method = getattr(obj, name)

        async def counted(*args, **kwargs):
            self.count += 1
            try:
                return await method(*args, **kwargs)
            finally:
                self.answered.set()

        monkeypatch.setattr(obj, name, counted)


# The most sends QueueReferee can try within a 1.5 s timeout: its backoff between tries is at least
# 0.05, 0.1, 0.2, 0.4, then 0.8 s (``referee.queue._backoff``), so a sixth try would start after
# 1.55 s; the sender stops when the next try would be too late. A bound on tries, not on seconds:
# a slower machine tries fewer times, never more.
MAX_TRIES_IN_1_5_S = 5


# ---------------------------------------------------------------- tenants and Redis


def tenants_file(tmp_path: Path, names: list[str]) -> tuple[Path, dict[str, str], list[dict]]:
    """A tenants file for ``names``, each with a new key: (its path, tenant -> key, the tenants)."""
    keys = {n: new_key(n) for n in names}
    tenants = [{"name": n, "keys": [hash_key(k)], "weight": 1.0} for n, k in keys.items()]
    path = tmp_path / "tenants.yaml"
    path.write_text(yaml.safe_dump({"tenants": tenants}))
    return path, keys, tenants


class OwnRedis:
    """A throwaway redis-server (AOF on) that a test may kill and restart."""

    def __init__(self, root: Path) -> None:
        self.root, self.port, self.proc, self.runs = root, _free_port(), None, 0
        self.dir = root / "data-0"
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self, *, lose_data: bool = False) -> None:
        if lose_data:  # a restart that lost everything (no persistence, or a new volume)
            self.runs += 1
            self.dir = self.root / f"data-{self.runs}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
                *("--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.dir)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis_sync.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    break
            except (redis_sync.ConnectionError, redis_sync.BusyLoadingError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------- the docs' recipes
# A docs page marks each Python block that runs in the tests with an HTML comment just before it:
# ``<!-- tested -->``, or ``<!-- tested requires=MODULE -->`` for a block that needs a package the
# environment may lack. A block starts with its settings as constants (URL, RM, JUDGE).

PAGES = ("trl", "openrlhf", "verl", "slime", "verifiers", "openai")
MARK = re.compile(r"<!-- tested(?: requires=(?P<requires>[\w.]+))? -->\n```python\n(?P<code>.*?)```", re.S)
SETTING = re.compile(r'^(?P<name>URL|RM|JUDGE) = "[^"]*"', re.M)


@dataclass(frozen=True)
class Snippet:
    page: str
    index: int  # among the page's tested blocks
    code: str
    requires: str | None

    @property
    def where(self) -> str:
        return f"docs/{self.page}.md, tested block {self.index}"

    def run(self, **settings: str) -> dict:
        """Execute the block with its settings replaced; its variables afterwards."""
        code = SETTING.sub(lambda m: f"{m['name']} = {settings[m['name']]!r}", self.code)
        uncommented = re.sub(r"#.*", "", code)
        assert "referee:8000" not in uncommented, f"{self.where} reaches the server other than through URL"
        namespace: dict = {"__name__": f"recipe_{self.page}_{self.index}"}
        exec(compile(code, self.where, "exec"), namespace)
        return namespace


def snippets(page: str) -> list[Snippet]:
    text = (REPO / "docs" / f"{page}.md").read_text()
    return [Snippet(page, k, m["code"], m["requires"]) for k, m in enumerate(MARK.finditer(text))]


def snippet(page: str, index: int = 0) -> Snippet:
    return snippets(page)[index]


def served_dtype(client, judge: str) -> str | None:
    """The dtype a served judge's engine runs in (``/judges``)."""
    return {j["name"]: j["dtype"] for j in client.get("/judges").json()["judges"]}[judge]


# How far two answers of the same engine to the same input may differ when they were computed in
# different batches or with and without prefix-cache hits: float32 engines on the CPU build repeat
# their answers to about 1e-6; bfloat16 ones do not (the reduction order changes with the batch),
# and a probability near a tie moved by up to a few hundredths in the tests here.
RECOMPUTE_TOLERANCE = {"float32": 1e-6, "bfloat16": 0.05}


# ---------------------------------------------------------------- a backend that fails on demand


class FaultProxy:
    """A TCP proxy in front of a real server, in a thread of its own, whose ``mode`` the test sets:
    ``pass`` (forward), ``reset`` (accept and close at once: a killed backend), or an HTTP status
    (``503``, ``429``: answered without forwarding, with ``Retry-After: 0``). Counts what it did."""

    def __init__(self, target_port: int) -> None:
        import threading

        self.target_port = target_port
        self.port = _free_port()
        self.mode = "pass"
        self.counts: dict[str, int] = {}
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self, ready) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port)
        )
        ready.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mode = self.mode
        self.counts[mode] = self.counts.get(mode, 0) + 1
        try:
            if mode == "reset":
                return
            if mode != "pass":
                await reader.read(65536)
                body = b'{"error": "injected"}'
                writer.write(
                    f"HTTP/1.1 {mode} Injected\r\nContent-Type: application/json\r\nRetry-After: 0\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

            async def pipe(src, dst, counted: str | None = None):
                with contextlib.suppress(Exception):
                    while data := await src.read(65536):
                        if self.mode != "pass":  # killed (or refusing) mid-connection
                            break
                        if counted:
                            self.counts[counted] = self.counts.get(counted, 0) + 1
                        dst.write(data)
                        await dst.drain()
                with contextlib.suppress(Exception):
                    dst.close()

            await asyncio.gather(pipe(reader, up_writer, "forwarded"), pipe(up_reader, writer))
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def start_vllm_server(model: str, log_path: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    """vLLM's own OpenAI-compatible server (the CPU build here) on ``model``: a remote judge's
    backend. Float32 and eager, so that its answers can be compared with an in-process engine's."""
    port = _free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
        "--host", "127.0.0.1", "--port", str(port), "--seed", "0", "--dtype", "float32",
        "--enforce-eager", "--max-model-len", "2048", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, port
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            pytest.fail(f"vllm serve did not start:\n{log_path.read_text()[-4000:]}")
        time.sleep(1)
