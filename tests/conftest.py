"""Shared fixtures: real models on disk and one real referee server (vLLM CPU engines) per session.

The server runs as its own process, started by the same command users run (``referee serve``),
with the embedded SmolLM2 chat judge (``dtype: auto``, which the server resolves by the CPU rule in
``reward_server.hardware``) and a tiny reward model served in float32, plus the same reward model in
bfloat16 where the processor has native bf16 (elsewhere bf16 runs on a slow path and its test is
skipped). Starting the engines takes about a minute on two cores, so every server test shares it.
The fixtures apply to every layer (unit/, serving/, queue/, deploy/); what test modules share
besides fixtures (settings, starting and stopping a server, fakes) is in ``tests/support.py``.
"""

from __future__ import annotations

import copy
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.support import (
    REDIS_URL,
    TEST_CACHE,
    TEST_DATA,
    TEST_LIMITS,
    TEST_MEDIA,
    TEST_QUEUE,
    native_bf16,
    start_server,
    stop_server,
)


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from referee.embedded import ensure_embedded

    return ensure_embedded("smollm2")


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory, embedded_dir) -> Path:
    from tests.model_factory import make_tiny_classifier

    return make_tiny_classifier(tmp_path_factory.mktemp("models") / "tiny-rm", embedded_dir)


@pytest.fixture(scope="session")
def tiny_objectives_dir(tmp_path_factory, embedded_dir) -> Path:
    from tests.model_factory import make_tiny_multi_classifier

    return make_tiny_multi_classifier(tmp_path_factory.mktemp("models") / "tiny-objectives", embedded_dir)


@pytest.fixture(scope="session")
def tiny_prm_dir(tmp_path_factory, embedded_dir) -> Path:
    from tests.model_factory import make_tiny_prm

    return make_tiny_prm(tmp_path_factory.mktemp("models") / "tiny-prm", embedded_dir)


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory, embedded_dir) -> Path:
    from tests.model_factory import make_tiny_vlm

    return make_tiny_vlm(tmp_path_factory.mktemp("models") / "tiny-vlm", embedded_dir)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from tests.model_factory import make_tiny_clip

    corpus = TEST_DATA / "hh_harmless_subset.jsonl"
    return make_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip", corpus)


@pytest.fixture(scope="session")
def redis_prefix() -> str:
    """A key prefix of this test session's own, removed at the end."""
    import redis

    prefix = f"referee-test-{uuid.uuid4().hex[:8]}"
    yield prefix
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(f"{prefix}:*", count=1000))
    if keys:
        r.delete(*keys)
    r.close()


@pytest.fixture(scope="session")
def server_config(
    tmp_path_factory, tiny_classifier_dir, tiny_objectives_dir, tiny_prm_dir, redis_prefix
) -> Path:
    config = {
        "default_judge": "smollm2",
        "limits": TEST_LIMITS,
        "cache": TEST_CACHE,
        "queue": {"enabled": True, "url": REDIS_URL, "prefix": redis_prefix, **TEST_QUEUE},
        "judges": [
            {
                "name": "smollm2",
                "kind": "generative",
                "model": "embedded:smollm2",
                "engine": {
                    "dtype": "auto",
                    "max_model_len": 2048,
                    "kv_cache_memory_gib": 0.5,
                    # Small engine steps: a newly arrived request of a small job (served first by
                    # priority) never waits long for the step in progress (test_queue fairness).
                    "extra": {"max_num_batched_tokens": 256},
                },
            },
            {
                "name": "tiny-rm",
                "kind": "classifier",
                "model": str(tiny_classifier_dir),
                "engine": {"dtype": "float32", "max_model_len": 1024, "kv_cache_memory_gib": 0.125},
            },
        ],
    }
    config["judges"] += [
        # the same model and engine settings as smollm2: served by smollm2's engine, not a second one
        {
            "name": "followup",
            "kind": "followup",
            "model": "embedded:smollm2",
            "engine": copy.deepcopy(config["judges"][0]["engine"]),
        },
        {
            "name": "tiny-objectives",
            "kind": "classifier",
            "model": str(tiny_objectives_dir),
            "engine": {"dtype": "float32", "max_model_len": 1024, "kv_cache_memory_gib": 0.125},
        },
        {
            "name": "tiny-prm",
            "kind": "prm",
            "model": str(tiny_prm_dir),
            "engine": {"dtype": "float32", "max_model_len": 1024, "kv_cache_memory_gib": 0.0625},
        },
        # no engine of their own: judges above, answering together
        {"name": "panel", "kind": "ensemble", "members": ["smollm2", "tiny-rm"]},
        {
            "name": "panel-pointwise",
            "kind": "ensemble",
            "members": ["followup", "tiny-rm"],
            "aggregate": "uncertainty",
        },
    ]
    if native_bf16():
        config["judges"].append(
            {
                "name": "tiny-rm-bf16",
                "kind": "classifier",
                "model": str(tiny_classifier_dir),
                "engine": {"dtype": "bfloat16", "max_model_len": 1024, "kv_cache_memory_gib": 0.125},
            }
        )
    path = tmp_path_factory.mktemp("config") / "judges.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def server_log(tmp_path_factory) -> Path:
    """The shared server's log (its start-up lines say which dtype and cores each engine got)."""
    return tmp_path_factory.getbasetemp() / "server.log"


@pytest.fixture(scope="session")
def server_url(server_config, server_log) -> str:
    if os.environ.get("REFEREE_TEST_URL"):  # a server already started with tests/conftest's config
        yield os.environ["REFEREE_TEST_URL"]
        return
    proc, url = start_server(server_config, server_log)
    try:
        yield url
    finally:
        stop_server(proc)


@pytest.fixture()
def client(server_url):
    with httpx.Client(base_url=server_url, timeout=300) as c:
        yield c


# ------------------------------------------------------------------ a server shared by tenants

TENANTS = [
    {"name": "team-a", "weight": 2.0},
    {"name": "team-b", "weight": 1.0},
    {"name": "team-c", "weight": 1.0, "max_inflight": 4, "max_queued": 3},
    {"name": "team-d", "weight": 1.0, "tokens_per_minute": 2000},
]


@dataclass
class TenantServer:
    url: str
    redis_url: str
    prefix: str
    keys: dict[str, str]  # tenant -> its plaintext API key
    tenants: list[dict]  # as given to the server (hashed keys)
    log: Path

    def headers(self, tenant: str, job: str | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"}
        if job is not None:
            headers["X-Referee-Job"] = job
        return headers


@pytest.fixture(scope="session")
def tenant_server(tmp_path_factory, tiny_classifier_dir, tiny_vlm_dir, tiny_clip_dir) -> TenantServer:
    """A second real server, with keys: four tenants (weights 2:1:1:1, limits on team-c and team-d), the tiny
    reward model (the default judge), the tiny vision-language judge (``tiny-vlm``, float32, so
    that small differences between images are not lost to rounding) and a tiny CLIP image scorer
    (``tiny-clip``), the queue on its own prefix,
    and a Redis ACL user per tenant made by ``referee.acl`` (removed at the end; the shared Redis
    keeps its default user)."""
    import redis

    from referee.acl import acl_rules, apply_acl, remove_users
    from referee.auth import hash_key, new_key

    prefix = f"referee-tenants-{uuid.uuid4().hex[:8]}"
    keys = {t["name"]: new_key(t["name"]) for t in TENANTS}
    tenants = [{**t, "keys": [hash_key(keys[t["name"]])]} for t in TENANTS]
    config = {
        "limits": TEST_LIMITS,
        "cache": TEST_CACHE,
        "queue": {"enabled": True, "url": REDIS_URL, "prefix": prefix, **TEST_QUEUE},
        "tenants": tenants,
        "operators": ["team-d"],  # sees every tenant's figures at /metrics
        "judges": [
            {
                "name": "tiny-rm",
                "kind": "classifier",
                "model": str(tiny_classifier_dir),
                "engine": {"dtype": "float32", "max_model_len": 1024, "kv_cache_memory_gib": 0.125},
            },
            {
                "name": "tiny-vlm",
                "kind": "generative",
                "model": str(tiny_vlm_dir),
                # an untrained model's label mass varies a lot between inputs (see make_tiny_vlm)
                "min_label_mass": 0.001,
                "engine": {"dtype": "float32", "max_model_len": 2048, "kv_cache_memory_gib": 0.25},
            },
            {
                "name": "tiny-clip",
                "kind": "clip",
                "model": str(tiny_clip_dir),
                "engine": {"dtype": "float32", "max_model_len": 77, "kv_cache_memory_gib": 0.0625},
            },
        ],
        "media": TEST_MEDIA,
    }
    folder = tmp_path_factory.mktemp("tenants")
    path = folder / "judges.yaml"
    path.write_text(yaml.safe_dump(config))
    admin = redis.Redis.from_url(REDIS_URL)
    users = apply_acl(admin, acl_rules(tenants, prefix=prefix, disable_default=False))
    log = folder / "server.log"
    proc, url = start_server(path, log)
    try:
        yield TenantServer(url, REDIS_URL, prefix, keys, tenants, log)
    finally:
        stop_server(proc)
        remove_users(admin, users)
        stale = list(admin.scan_iter(f"{prefix}:*", count=1000))
        if stale:
            admin.delete(*stale)
        admin.close()
