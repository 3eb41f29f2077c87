"""Failures caused on purpose, and what the user sees: a killed engine core, judges that cannot load,
oversized bodies, deadlines and clients that go away.

The engine-death and load-failure tests start their own small server (a tiny reward model), never
the shared one; the others use the shared server.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest
import yaml

from tests.support import REPO, TEST_LIMITS, _free_port, start_server, stop_server

QUESTION = "What is the capital of France?"


def _inflight(client: httpx.Client) -> float:
    text = client.get("/metrics").text
    return float(re.search(r"^referee_inflight_engine_requests (\S+)$", text, re.M).group(1))


def _verdicts(client: httpx.Client) -> float:
    """The shared judge's verdicts so far: a request's are counted when it finishes, never if it
    was cancelled."""
    text = client.get("/metrics").text
    return sum(
        float(v) for v in re.findall(r'^referee_verdicts_total\{judge="smollm2",[^}]*\} (\S+)$', text, re.M)
    )


def _wait_inflight_zero(client: httpx.Client, guard_s: float = 600) -> None:
    """Until no engine request is in flight; ``guard_s`` only stops a wait that would never end."""
    deadline = time.monotonic() + guard_s
    while time.monotonic() < deadline:
        if _inflight(client) == 0:
            return
        time.sleep(0.1)
    pytest.fail(f"engine requests still in flight after {guard_s}s: {_inflight(client)}")


def _cot_body(tokens: int = 256) -> dict:
    """A chain-of-thought question that keeps the engine busy for many seconds."""
    item = {"prompt": QUESTION, "response_a": "Paris.", "response_b": "Lyon."}
    return {"items": [item] * 8, "mode": "cot", "max_new_tokens": tokens, "max_retries": 0}


# ------------------------------------------------------------------ engine death, failed load


def _small_config(tmp_path, model: str) -> os.PathLike:
    config = {
        "judges": [
            {
                "name": "rm",
                "kind": "classifier",
                "model": model,
                "engine": {"dtype": "float32", "max_model_len": 512, "kv_cache_memory_gib": 0.0625},
            }
        ]
    }
    path = tmp_path / "judges.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_killed_engine_core_makes_the_server_unready_and_exit(tmp_path, tiny_classifier_dir):
    proc, url = start_server(_small_config(tmp_path, str(tiny_classifier_dir)), tmp_path / "server.log")
    try:
        body = {"items": [{"prompt": QUESTION, "response": "Paris."}]}
        assert httpx.post(f"{url}/score", json=body, timeout=60).status_code == 200
        cores = [p for p in psutil.Process(proc.pid).children(recursive=True) if "EngineCore" in p.name()]
        assert cores, [p.name() for p in psutil.Process(proc.pid).children(recursive=True)]
        for p in cores:
            p.send_signal(signal.SIGKILL)
        seen = []
        deadline = time.monotonic() + 90
        # a question the judgment cache has not seen: it needs the (dead) engine
        body = {"items": [{"prompt": QUESTION, "response": "Lyon, surely."}]}
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                score = httpx.post(f"{url}/score", json=body, timeout=10)
                ready = httpx.get(f"{url}/readyz", timeout=5)
                seen.append((score.status_code, ready.status_code))
                # Never a 200 with a null score: the request fails as a whole, and the server is unready.
                assert score.status_code == 503, score.text
                assert ready.status_code == 503, ready.text
            except httpx.TransportError:
                pass  # already stopped listening
            time.sleep(0.2)
        assert proc.wait(timeout=30) == 3, "the server must exit non-zero so that it is restarted"
        log = (tmp_path / "server.log").read_text()
        assert "died" in log, log[-3000:]
    finally:
        stop_server(proc, sig=signal.SIGKILL)


def test_judges_that_cannot_load_make_the_server_exit(tmp_path):
    path = _small_config(tmp_path, str(tmp_path / "no-such-model"))
    log = tmp_path / "server.log"
    port = _free_port()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "referee.cli", "serve", "--config", str(path), "--port", str(port)],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
    try:
        code = proc.wait(timeout=180)
    finally:
        stop_server(proc, sig=signal.SIGKILL)
    assert code == 3, log.read_text()[-3000:]
    assert "failed to load" in log.read_text()


# ------------------------------------------------------------------ bounded cost at the edge


def test_a_body_over_the_byte_limit_is_refused_before_parsing(client):
    limit = TEST_LIMITS["max_body_bytes"]
    junk = b"{" + b"x" * (limit + 10)  # not even JSON: a parser would say 422
    r = client.post("/score", content=junk, headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert "limits.max_body_bytes" in r.json()["message"]

    def chunks():  # no Content-Length: the limit holds while the body streams in
        for _ in range(limit // 65536 + 2):
            yield b"x" * 65536

    r = client.post("/score", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert client.get("/healthz").status_code == 200


def test_a_request_past_its_deadline_is_cancelled_with_504(client):
    verdicts = _verdicts(client)
    r = client.post("/pairwise", json=_cot_body(), headers={"X-Request-Timeout": "1"})
    assert r.status_code == 504, r.text
    assert r.json()["error"] == "deadline_exceeded"
    _wait_inflight_zero(client)  # its slots freed...
    assert _verdicts(client) == verdicts  # ...by cancelling it: none of its 8 items was judged to the end
    r = client.post("/pairwise", json=_cot_body(), headers={"X-Request-Timeout": "soon"})
    assert r.status_code == 400 and "X-Request-Timeout" in r.json()["message"]


def test_a_client_that_goes_away_frees_its_engine_work(server_url, client):
    verdicts = _verdicts(client)
    with httpx.Client(base_url=server_url, timeout=1.0) as impatient, pytest.raises(httpx.ReadTimeout):
        impatient.post("/pairwise", json=_cot_body())
    _wait_inflight_zero(client)  # its slots freed...
    assert _verdicts(client) == verdicts  # ...by cancelling it, not by judging its 8 items to the end
    # ... and the judge still answers the next question.
    ok = client.post(
        "/pairwise", json={"items": [{"prompt": QUESTION, "response_a": "a", "response_b": "b"}]}
    )
    assert ok.status_code == 200


def test_a_large_request_does_not_stall_the_api_process(server_url, client):
    """Templating and tokenising a legal but large /winrate (12 responses near the text limit, both
    orders: 132 long prompts) runs off the event loop: liveness and small requests still answer."""
    import concurrent.futures as cf

    text = "All work and no play makes a dull judge. " * (TEST_LIMITS["max_text_chars"] // 42)
    body = {"prompt": QUESTION, "responses": [f"{k} {text}" for k in range(12)], "order": "both"}
    waits: list[float] = []

    def big():
        t0 = time.monotonic()
        r = httpx.post(f"{server_url}/winrate", json=body, timeout=600)
        return r, time.monotonic() - t0

    with cf.ThreadPoolExecutor(1) as pool:
        future = pool.submit(big)
        time.sleep(0.3)
        while not future.done():
            t0 = time.monotonic()
            assert client.get("/healthz").status_code == 200
            waits.append(time.monotonic() - t0)
            time.sleep(0.05)
        response, took = future.result()
    assert response.status_code == 200, response.text
    # Every pair failed for its own cause (each prompt is longer than the engine's context) and says so.
    assert response.json()["invalid"] == 66
    print(f"large /winrate took {took:.1f}s; /healthz answered {len(waits)} times, worst {max(waits):.3f}s")
    # Answered all along: many times, and never kept waiting for a good part of the large request
    # (a stalled event loop would hold one /healthz for about all of it).
    assert len(waits) >= 3
    assert max(waits) < took / 2


def test_a_small_request_of_another_job_is_not_queued_behind_a_large_ones_prompts(server_url, client):
    """The engine's tokeniser thread takes prompts in the fair scheduler's order, not first come
    first served: another job's one-item /pairwise, sent while a large /winrate's 132 long prompts
    are being templated, is answered before the large request ends (behind them it would wait for
    all of them)."""
    import concurrent.futures as cf

    text = "Tokenising takes a while when every text is long. " * (TEST_LIMITS["max_text_chars"] // 52)
    body = {"prompt": text, "responses": [f"{k} {text}" for k in range(12)], "order": "both"}
    small = {"items": [{"prompt": QUESTION, "response_a": "Paris.", "response_b": "Rome."}]}

    def timed(path, payload, job):
        r = httpx.post(f"{server_url}{path}", json=payload, headers={"X-Referee-Job": job}, timeout=600)
        return r, time.monotonic()

    client.post("/pairwise", json=small)  # warm: the small request's own cost, measured below
    t0 = time.monotonic()
    client.post("/pairwise", json=small, headers={"X-Referee-Job": "alone"})
    alone = time.monotonic() - t0
    with cf.ThreadPoolExecutor(2) as pool:
        started = time.monotonic()
        big = pool.submit(timed, "/winrate", body, "large-job")
        time.sleep(1.0)
        sent = time.monotonic()
        little = pool.submit(timed, "/pairwise", small, "small-job")
        (big_r, big_end), (small_r, small_end) = big.result(), little.result()
    assert big_r.status_code == 200 and small_r.status_code == 200, (big_r.text, small_r.text)
    assert big_r.json()["invalid"] == 66  # every prompt over the context: tokenising is its work
    assert len(small_r.json()["results"]) == 1
    print(
        f"large /winrate {big_end - started:.1f}s; one-item /pairwise beside it {small_end - sent:.2f}s "
        f"(alone {alone:.2f}s)"
    )
    assert small_end < big_end, "the small request waited for every prompt of the large one"
