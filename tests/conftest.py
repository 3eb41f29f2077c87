"""Shared fixtures: real models on disk and one real referee server (vLLM CPU engines) per session.

The server runs as its own process, started by the same command users run (``referee serve``),
with three judges: the embedded SmolLM2 chat judge and a tiny reward model served in float32 and
in bfloat16. Starting the engines takes about a minute on two cores, so every server test shares it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
READY_TIMEOUT_S = 600

# Limits small enough for the tests to reach them with small requests.
TEST_LIMITS = {
    "max_items": 64,
    "max_group_size": 16,
    "max_text_chars": 20_000,
    "max_inflight": 160,
    "max_retries": 2,
    "max_new_tokens": 256,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from reward_server.embedded import ensure_embedded

    return ensure_embedded("smollm2")


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory, embedded_dir) -> Path:
    from tests.model_factory import make_tiny_classifier

    return make_tiny_classifier(tmp_path_factory.mktemp("models") / "tiny-rm", embedded_dir)


@pytest.fixture(scope="session")
def server_config(tmp_path_factory, tiny_classifier_dir) -> Path:
    config = {
        "default_judge": "smollm2",
        "limits": TEST_LIMITS,
        "judges": [
            {
                "name": "smollm2",
                "kind": "generative",
                "model": "embedded:smollm2",
                "engine": {"dtype": "bfloat16", "max_model_len": 2048, "kv_cache_memory_gib": 0.5},
            },
            {
                "name": "tiny-rm",
                "kind": "classifier",
                "model": str(tiny_classifier_dir),
                "engine": {"dtype": "float32", "max_model_len": 1024, "kv_cache_memory_gib": 0.125},
            },
            {
                "name": "tiny-rm-bf16",
                "kind": "classifier",
                "model": str(tiny_classifier_dir),
                "engine": {"dtype": "bfloat16", "max_model_len": 1024, "kv_cache_memory_gib": 0.125},
            },
        ],
    }
    path = tmp_path_factory.mktemp("config") / "judges.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def server_url(server_config, tmp_path_factory) -> str:
    if os.environ.get("REFEREE_TEST_URL"):  # a server already started with tests/conftest's config
        yield os.environ["REFEREE_TEST_URL"]
        return
    port = _free_port()
    log_path = tmp_path_factory.mktemp("logs") / "server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("REFEREE_CONFIG", None)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "referee.cli",
                "serve",
                "--config",
                str(server_config),
                "--port",
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the server was not ready after {READY_TIMEOUT_S}s:\n{log_path.read_text()[-4000:]}"
                )
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture()
def client(server_url):
    with httpx.Client(base_url=server_url, timeout=300) as c:
        yield c
