"""The remote judge's fleet logic (reward_server.remote): which failures are retried and where, when
a backend is taken out and brought back, and what the caller sees when none is left. The backends
are httpx mock transports (pure client logic); tests/serving/test_remote.py runs real vLLM servers."""

from __future__ import annotations

import httpx
import pytest

from reward_server.engine_types import BackendsUnavailable
from reward_server.judge_settings import RemoteSettings
from reward_server.remote import BackendRefused, RemoteEngine, _token_id


def _engine(handlers: dict[str, callable], **settings) -> RemoteEngine:
    remote = RemoteSettings(urls=list(handlers), backoff_s=0.0, open_s=60.0, **settings)
    engine = RemoteEngine(None, "model", "generate", remote, 2048)
    for b in engine.backends:
        b.client = httpx.AsyncClient(base_url=b.url, transport=httpx.MockTransport(handlers[b.url]))
    return engine


def _ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"ok": request.url.host})


def _status(code: int):
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(code, text=f"status {code}")

    return handler


def _refuse_connection(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


async def test_a_retryable_failure_is_retried_on_the_other_backend():
    for failing in (_status(503), _status(429), _refuse_connection):
        engine = _engine({"http://a": failing, "http://b": _ok})
        for _ in range(6):
            assert (await engine._post("/x", {}, 1)) == {"ok": "b"}
        a, b = engine.backends
        assert b.answered == 6 and a.failed >= 1


async def test_a_client_error_is_not_retried():
    calls = []

    def bad(request):
        calls.append(request.url.host)
        return httpx.Response(400, text="prompt too long")

    engine = _engine({"http://a": bad, "http://b": bad})
    with pytest.raises(BackendRefused, match="prompt too long"):
        await engine._post("/x", {}, 1)
    assert len(calls) == 1 and all(b.state == "up" for b in engine.backends)


async def test_failures_take_a_backend_out_and_none_left_is_unavailable():
    engine = _engine({"http://a": _status(503), "http://b": _status(502)}, failures_to_open=2, retries=3)
    with pytest.raises(BackendsUnavailable) as raised:
        await engine._post("/x", {}, 1)
    assert all(b.state == "out" for b in engine.backends)
    assert "http://a" in str(raised.value) and "503" in str(raised.value)
    # out: the next call fails at once, without a request to either backend
    answered = sum(b.failed for b in engine.backends)
    with pytest.raises(BackendsUnavailable, match="is out"):
        await engine._post("/x", {}, 1)
    assert sum(b.failed for b in engine.backends) == answered and not engine.available


async def test_a_health_check_brings_a_backend_back():
    state = {"healthy": False}

    def backend(request):
        if request.url.path == "/health":
            return httpx.Response(200 if state["healthy"] else 503)
        return httpx.Response(200, json={"ok": 1}) if state["healthy"] else httpx.Response(503)

    engine = _engine({"http://a": backend}, failures_to_open=1, retries=0)
    with pytest.raises(BackendsUnavailable):
        await engine._post("/x", {}, 1)
    (a,) = engine.backends
    assert a.state == "out"
    state["healthy"] = True
    a.open_until = 0.0  # due for its check
    await engine._health_check(a)
    assert a.state == "up" and (await engine._post("/x", {}, 1)) == {"ok": 1}


def test_top_logprobs_must_name_tokens_by_id():
    assert _token_id("token_id:42") == 42
    with pytest.raises(ValueError, match="return_tokens_as_token_ids"):
        _token_id("Paris")


async def test_every_5xx_is_retried():
    for code in (500, 501, 505, 599):
        engine = _engine({"http://a": _status(code), "http://b": _ok})
        for _ in range(4):
            assert (await engine._post("/x", {}, 1)) == {"ok": "b"}


def test_a_kind_that_cannot_be_remote_is_refused_at_load():
    from reward_server.judges import parse_judge_settings
    from reward_server.judges.base import JudgeConfigError
    from reward_server.judges.registry import load_judge

    cfg = parse_judge_settings(
        {"name": "c", "kind": "clip", "model": "/nowhere", "engine": {"remote": {"urls": ["http://x"]}}}
    )
    with pytest.raises(JudgeConfigError, match="a clip judge cannot be remote"):
        load_judge(cfg)
