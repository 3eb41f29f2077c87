"""Tenants over HTTP against a real server with keys (the ``tenant_server`` fixture: a real vLLM
engine serving a tiny reward model): who may call what, the 401s and 429s a user sees, per-tenant
idempotency and accounting, and the open mode's refusal to listen on a public address."""

from __future__ import annotations

import concurrent.futures as cf
import re
import subprocess
import sys
import threading

import httpx
import pytest
import yaml

from tests.support import REPO

QUESTION = "What is the capital of France?"
ITEM = {"prompt": QUESTION, "response": "The capital of France is Paris."}


def _score(ts, tenant=None, items=None, headers=None, path="/score", **kw):
    headers = headers if headers is not None else ts.headers(tenant) if tenant else {}
    return httpx.post(f"{ts.url}{path}", json={"items": items or [ITEM]}, headers=headers, timeout=120, **kw)


def test_judging_without_a_valid_key_is_401_with_a_message(tenant_server):
    ts = tenant_server
    cases = {
        "missing": {},
        "unknown": {"Authorization": "Bearer rk.team-a.not-the-key"},
        "not bearer": {"Authorization": f"Basic {ts.keys['team-a']}"},
        "empty": {"Authorization": "Bearer"},
    }
    for name, headers in cases.items():
        r = _score(ts, headers=headers)
        assert r.status_code == 401, (name, r.text)
        assert r.json()["error"] == "unauthorized" and r.json()["message"], name
        assert r.headers["WWW-Authenticate"].startswith("Bearer"), name
    # every judging and compatibility route, /judges and /metrics; probes stay open
    for method, path in [
        ("POST", "/pairwise"),
        ("POST", "/judge"),
        ("POST", "/winrate"),
        ("POST", "/get_reward"),
        ("POST", "/classify"),
        ("GET", "/judges"),
        ("GET", "/metrics"),
    ]:
        assert httpx.request(method, f"{ts.url}{path}", json={}).status_code == 401, path
    assert httpx.get(f"{ts.url}/healthz").status_code == 200
    assert httpx.get(f"{ts.url}/readyz").status_code == 200
    # a key is refused before its body is read: no 422 for a bad body without a key
    assert httpx.post(f"{ts.url}/score", content=b"{not json", headers={}).status_code == 401


def test_each_tenant_key_works_and_idempotency_keys_are_per_tenant(tenant_server):
    ts = tenant_server
    for tenant in ("team-a", "team-b"):
        r = _score(ts, tenant)
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["score"] is not None
    assert httpx.get(f"{ts.url}/judges", headers=ts.headers("team-b")).json()["default"] == "tiny-rm"
    # team-b reusing team-a's Idempotency-Key for another body is not a conflict with team-a's
    key = {"Idempotency-Key": "shared-key-1"}
    a = _score(ts, headers={**ts.headers("team-a"), **key})
    b = _score(ts, headers={**ts.headers("team-b"), **key}, items=[ITEM, ITEM])
    assert a.status_code == 200 and b.status_code == 200, (a.text, b.text)
    assert len(a.json()["results"]) == 1 and len(b.json()["results"]) == 2
    again = _score(ts, headers={**ts.headers("team-a"), **key}, items=[ITEM, ITEM])
    assert again.status_code == 422 and again.json()["error"] == "idempotency_key_reused"


def test_jobs_are_named_by_header_and_checked(tenant_server):
    ts = tenant_server
    assert _score(ts, headers=ts.headers("team-b", job="run-7.seed_1")).status_code == 200
    bad = _score(ts, headers=ts.headers("team-b", job="bad job/id"))
    assert bad.status_code == 400 and "X-Referee-Job" in bad.json()["message"]


def test_a_path_token_authenticates_and_is_not_logged(tenant_server):
    ts = tenant_server
    key = ts.keys["team-b"]
    assert _score(ts, headers={}, path=f"/k/{key}/score").status_code == 200
    assert _score(ts, headers={}, path="/k/rk.team-b.wrong/score").status_code == 401
    assert _score(ts, headers={}, path="/k/").status_code == 404
    log = ts.log.read_text()
    assert "POST /score" in log and key not in log


def test_tenant_limits_answer_429_or_413_naming_the_limit(tenant_server):
    ts = tenant_server
    # team-c: max_inflight 4 engine requests
    too_big = _score(ts, "team-c", items=[ITEM] * 5)
    assert too_big.status_code == 413 and "max_inflight of 4" in too_big.json()["message"]
    long_item = {"prompt": QUESTION * 20, "response": "Paris is the capital of France. " * 100}

    def burst(n: int) -> list[httpx.Response]:
        start = threading.Barrier(n)

        def send(_):
            start.wait()
            return _score(ts, "team-c", items=[long_item] * 4)

        with cf.ThreadPoolExecutor(n) as pool:
            return list(pool.map(send, range(n)))

    # Whether simultaneous requests overlap in the engine depends on timing: send rounds of them
    # until one overlaps (the first round nearly always does); the rule itself is timing-free in
    # tests/unit/test_fairness.py.
    limited = []
    for _ in range(10):
        responses = burst(24)
        codes = sorted(r.status_code for r in responses)
        assert set(codes) <= {200, 429} and 200 in codes, codes
        limited = [r for r in responses if r.status_code == 429]
        if limited:
            break
    assert limited, "ten rounds of 24 simultaneous requests of 4 engine requests never exceeded a limit of 4"
    assert "max_inflight" in limited[0].json()["message"] and limited[0].headers["Retry-After"]
    # team-b, sharing the judge at the same time, was never limited by team-c's limit
    assert _score(ts, "team-b").status_code == 200
    # team-d: 2000 tokens per minute
    seen = []
    for _ in range(40):
        r = _score(ts, "team-d", items=[long_item] * 2)
        seen.append(r.status_code)
        if r.status_code == 429:
            break
    assert seen[-1] == 429 and seen[0] == 200, seen
    body = r.json()
    assert body["error"] == "rate_limited" and "tokens_per_minute (2000)" in body["message"]
    assert 1 <= int(r.headers["Retry-After"]) <= 60


def test_metrics_account_engine_work_by_tenant(tenant_server):
    ts = tenant_server
    assert _score(ts, "team-a", items=[ITEM] * 3).status_code == 200
    text = httpx.get(f"{ts.url}/metrics", headers=ts.headers("team-a")).text
    line = next(
        x for x in text.splitlines() if x.startswith('referee_tenant_engine_requests_total{tenant="team-a"}')
    )
    assert float(line.split()[-1]) >= 3


def test_a_tenant_sees_only_its_own_figures_at_metrics_and_an_operator_sees_all(tenant_server):
    ts = tenant_server
    assert _score(ts, "team-a").status_code == 200 and _score(ts, "team-b").status_code == 200

    def tenants_seen(as_tenant: str) -> set[str]:
        text = httpx.get(f"{ts.url}/metrics", headers=ts.headers(as_tenant)).text
        return set(re.findall(r'tenant="([^"]+)"', text))

    assert tenants_seen("team-a") == {"team-a"}
    assert tenants_seen("team-b") == {"team-b"}
    assert {"team-a", "team-b"} <= tenants_seen("team-d")  # the operator (settings.operators)


def _serve(tmp_path, host, *extra, env=None):
    config = tmp_path / "open.yaml"
    config.write_text(
        yaml.safe_dump({"judges": [{"name": "x", "kind": "classifier", "model": "/nonexistent"}]})
    )
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "referee.cli",
            "serve",
            "--config",
            str(config),
            "--host",
            host,
            "--port",
            "0",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "judge.example.com"])
def test_an_open_server_refuses_a_public_address(tmp_path, host):
    out = _serve(tmp_path, host)
    assert out.returncode != 0
    assert "refusing to listen" in out.stderr and "--allow-open" in out.stderr, out.stderr[-2000:]
