"""No tenant can take the shared judge down, through the real server with keys (``tenant_server``:
160 engine requests in flight, 80 waiting, four tenants, so each tenant without a max_inflight of its
own holds at most 80 and waits with at most 40): a request over a tenant's share, gathered samples
checked before they wait, and a gathered sample whose caller left taken out of its group. The rules
themselves, without timing, are in tests/unit/test_fairness.py, test_gathering.py and
test_tenant_shares.py."""

from __future__ import annotations

import time

import httpx

QUESTION = "Name a primary colour."


def _slime(ts, tenant, response, query="", prompt=QUESTION, timeout=60.0):
    url = f"{ts.url}/slime/reward?reward=winrate&judge=tiny-rm{query}"
    body = {"prompt": prompt, "response": response}
    return httpx.post(url, json=body, headers=ts.headers(tenant), timeout=timeout)


def test_a_request_over_a_tenants_share_of_the_engines_is_413_naming_it(tenant_server):
    ts = tenant_server
    # ten responses compared pairwise in both orders: 90 engine requests, over team-b's share of 80
    body = {"judge": "tiny-vlm", "prompt": QUESTION, "responses": [f"Colour {k}." for k in range(10)]}
    r = httpx.post(f"{ts.url}/winrate", json=body, headers=ts.headers("team-b"), timeout=60)
    assert r.status_code == 413, r.text
    assert "limits.tenant_share" in r.json()["message"] and "share of 80" in r.json()["message"]


def test_a_gathered_sample_is_checked_before_it_waits_for_its_group(tenant_server):
    ts = tenant_server
    # a group of 2 that would wait 600 s for its second sample: refused at once instead
    query = "&group_size=2&group_timeout_s=600"
    too_long = _slime(ts, "team-a", "x" * 20_001, query)  # limits.max_text_chars 20000
    assert too_long.status_code == 413 and "limits.max_text_chars" in too_long.json()["message"]
    url = f"{ts.url}/slime/reward?reward=winrate&judge=no-such-judge{query}"
    unknown = httpx.post(url, json={"prompt": QUESTION, "response": "Red."}, headers=ts.headers("team-a"))
    assert unknown.status_code == 404


def _disconnects(ts) -> float:
    text = httpx.get(f"{ts.url}/metrics", headers=ts.headers("team-a"), timeout=30).text
    prefix = 'referee_requests_total{route="/slime/reward",status="499"}'
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def test_a_gathered_sample_whose_caller_left_does_not_complete_a_group(tenant_server):
    ts = tenant_server
    query = "&group_size=2&group_timeout_s=3&incomplete=error"
    prompt = f"{QUESTION} (left)"  # a group of its own
    before = _disconnects(ts)
    try:
        _slime(ts, "team-b", "Red.", query, prompt, timeout=0.5)  # the client gives up and goes away
        raise AssertionError("a lone sample of a group of 2 was answered")
    except httpx.TimeoutException:
        pass
    for _ in range(400):  # until the server has seen the disconnect (a guard, not a duration)
        if _disconnects(ts) > before:
            break
        time.sleep(0.05)
    assert _disconnects(ts) > before, "the server never saw the client go away"
    # the second sample finds no one waiting: its group holds only itself and is refused at its deadline
    alone = _slime(ts, "team-b", "Blue.", query, prompt)
    assert alone.status_code == 504, alone.text
    assert "1 of its 2" in alone.json()["message"]
