"""Every route of a real server (vLLM CPU engines, embedded SmolLM2 judge, tiny reward models)."""

import concurrent.futures as cf
import math
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

QUESTION = "What is the capital of France?"
GOOD, BAD = "The capital of France is Paris.", "I like turtles."
GROUP = [GOOD, BAD, "Paris.", "London is the capital of France.", "It is Paris, on the Seine."]


def _post(client, route, body, status=200):
    r = client.post(route, json=body)
    assert r.status_code == status, r.text
    return r.json()


def test_health_ready_and_judges(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    info = client.get("/judges").json()
    assert info["default"] == "smollm2"
    by_name = {j["name"]: j for j in info["judges"]}
    assert by_name["smollm2"]["kind"] == "generative"
    assert set(by_name["smollm2"]["pairwise_modes"]) == {"logprob", "cot"}
    assert by_name["tiny-rm"]["kind"] == "classifier"
    assert "judge" not in by_name["tiny-rm"]["routes"]


def test_score_with_classifier_gives_raw_logits(client):
    body = {
        "judge": "tiny-rm",
        "items": [{"prompt": QUESTION, "response": GOOD}, {"prompt": QUESTION, "response": BAD}],
    }
    out = _post(client, "/score", body)
    scores = [r["score"] for r in out["results"]]
    assert [r["index"] for r in out["results"]] == [0, 1]
    assert all(r["error"] is None for r in out["results"])
    assert scores[0] != scores[1]  # raw logits, checked against transformers in test_fidelity
    assert out["usage"]["engine_requests"] == 2


def test_score_with_generative_judge_is_an_expected_rating(client):
    items = [
        {"prompt": QUESTION, "response": GOOD},
        {"prompt": [{"role": "user", "content": QUESTION}], "response": BAD},
    ]
    out = _post(client, "/score", {"items": items, "rubric": "Reward factual accuracy."})
    for r in out["results"]:
        assert r["error"] is None
        assert 1.0 <= r["score"] <= 9.0
        assert 0.01 <= r["label_mass"] <= 1.0 + 1e-9


@pytest.mark.parametrize("order", ["single", "random", "both"])
def test_pairwise_logprob_orders(client, order):
    items = [
        {"prompt": QUESTION, "response_a": GOOD, "response_b": BAD},
        {"prompt": QUESTION, "response_a": BAD, "response_b": GOOD},
    ]
    out = _post(client, "/pairwise", {"items": items, "mode": "logprob", "order": order, "seed": 3})
    assert out["usage"]["engine_requests"] == (4 if order == "both" else 2)
    for r in out["results"]:
        assert r["error"] is None
        assert 0.0 <= r["p_a"] <= 1.0
        expected = "tie" if r["p_a"] == 0.5 else ("A" if r["p_a"] > 0.5 else "B")
        assert r["verdict"] == expected
        assert (r["consistent"] is not None) == (order == "both")
        assert (r["swapped"] is not None) == (order == "random")


def test_pairwise_both_orders_average_the_two_probabilities(client):
    a_first = _post(
        client,
        "/pairwise",
        {"items": [{"prompt": QUESTION, "response_a": GOOD, "response_b": BAD}], "order": "single"},
    )["results"][0]
    b_first = _post(
        client,
        "/pairwise",
        {"items": [{"prompt": QUESTION, "response_a": BAD, "response_b": GOOD}], "order": "single"},
    )["results"][0]
    both = _post(
        client,
        "/pairwise",
        {"items": [{"prompt": QUESTION, "response_a": GOOD, "response_b": BAD}], "order": "both"},
    )["results"][0]
    assert both["p_a"] == pytest.approx((a_first["p_a"] + 1 - b_first["p_a"]) / 2, abs=0.02)
    assert both["consistent"] == ((a_first["verdict"] == "A") == (b_first["verdict"] == "B"))


def test_pairwise_random_order_is_seeded_and_unshuffled(client):
    items = [{"prompt": QUESTION, "response_a": GOOD, "response_b": BAD}] * 8
    one = _post(client, "/pairwise", {"items": items, "order": "random", "seed": 11})["results"]
    two = _post(client, "/pairwise", {"items": items, "order": "random", "seed": 11})["results"]
    assert [r["swapped"] for r in one] == [r["swapped"] for r in two]
    assert {r["swapped"] for r in one} == {True, False}
    single = _post(client, "/pairwise", {"items": items[:1], "order": "single"})["results"][0]
    swapped = _post(
        client,
        "/pairwise",
        {"items": [{"prompt": QUESTION, "response_a": BAD, "response_b": GOOD}], "order": "single"},
    )["results"][0]
    a_first, b_first = single["p_a"], 1 - swapped["p_a"]  # P(A better) as judged in each order
    assert abs(a_first - b_first) > 0.1  # the judge's position bias tells the two orders apart
    for r in one:  # answers are always about the caller's A, whichever was shown first
        right, wrong = (b_first, a_first) if r["swapped"] else (a_first, b_first)
        # Batches of different composition give slightly different numbers on this backend.
        assert abs(r["p_a"] - right) < min(0.05, abs(r["p_a"] - wrong))


@pytest.mark.parametrize("order", ["single", "both"])
def test_pairwise_cot_gives_rationales_and_a_parsed_or_invalid_verdict(client, order):
    items = [{"prompt": QUESTION, "response_a": GOOD, "response_b": BAD}]
    out = _post(
        client,
        "/pairwise",
        {"items": items, "mode": "cot", "order": order, "max_new_tokens": 48, "max_retries": 1, "seed": 1},
    )
    r = out["results"][0]
    assert len(r["rationales"]) == (2 if order == "both" else 1)
    assert all(isinstance(t, str) and t for t in r["rationales"])
    assert r["verdict"] in {"A", "B", "tie", "invalid"}
    if r["verdict"] == "invalid":
        assert r["error"] and r["p_a"] is None  # never silently a tie
    else:
        assert r["p_a"] in {0.0, 0.25, 0.5, 0.75, 1.0}
    assert out["usage"]["completion_tokens"] > 0


def test_sampled_cot_verdicts_vote_and_count_every_sample(client):
    """samples=3 in both orders: six sampled judgments per pair, each counted (valid or not), the
    majority the verdict; a /judge rating is the mean of its valid samples."""
    items = [{"prompt": QUESTION, "response_a": GOOD, "response_b": BAD}]
    body = {
        "items": items,
        "mode": "cot",
        "order": "both",
        "max_new_tokens": 24,
        "samples": 3,
        "cache": False,
    }
    out = _post(client, "/pairwise", body)
    r = out["results"][0]
    assert sum(r["votes"].values()) == 6 and set(r["votes"]) == {"A", "B", "tie", "invalid"}
    assert out["usage"]["engine_requests"] == 6
    valid = r["votes"]["A"] + r["votes"]["B"] + r["votes"]["tie"]
    if valid == 0:
        assert r["verdict"] == "invalid" and r["p_a"] is None and "sampled judgments" in r["error"]
    else:
        assert r["verdict"] in {"A", "B", "tie"} and 0.0 <= r["p_a"] <= 1.0
    judged = _post(
        client,
        "/judge",
        {
            "items": [{"prompt": QUESTION, "response": GOOD}],
            "samples": 3,
            "max_new_tokens": 24,
            "cache": False,
        },
    )["results"][0]
    assert sum(judged["votes"].values()) == 3
    if judged["score"] is not None:
        assert judged["uncertainty"] is not None
    refused = client.post("/pairwise", json={**body, "samples": 1000})
    assert refused.status_code == 422 and "limits.max_samples" in refused.json()["message"]


def test_pairwise_with_classifier_is_bradley_terry(client):
    items = [{"prompt": QUESTION, "response_a": GOOD, "response_b": BAD}]
    scores = [
        r["score"]
        for r in _post(
            client,
            "/score",
            {
                "judge": "tiny-rm",
                "items": [{"prompt": QUESTION, "response": GOOD}, {"prompt": QUESTION, "response": BAD}],
            },
        )["results"]
    ]
    r = _post(client, "/pairwise", {"judge": "tiny-rm", "items": items})["results"][0]
    assert r["p_a"] == pytest.approx(1 / (1 + math.exp(-(scores[0] - scores[1]))), abs=1e-4)
    assert r["verdict"] == ("A" if scores[0] > scores[1] else "B")


def test_judge_route_rates_one_and_compares_two(client):
    items = [
        {"prompt": QUESTION, "response": GOOD},
        {"prompt": QUESTION, "response_a": GOOD, "response_b": BAD},
    ]
    out = _post(client, "/judge", {"items": items, "max_new_tokens": 48, "max_retries": 1, "seed": 5})
    rating, verdict = out["results"]
    assert rating["kind"] == "score" and verdict["kind"] == "verdict"
    for r in (rating, verdict):
        assert r["rationale"]
        assert 1 <= r["attempts"] <= 2
    if rating["score"] is None:
        assert rating["error"] and rating["attempts"] == 2  # retried once, then reported
    else:
        assert 1 <= rating["score"] <= 9
    assert verdict["verdict"] in {"A", "B", "tie", "invalid"}
    assert (verdict["verdict"] == "invalid") == (verdict["error"] is not None)


def test_winrate_generative_round_robin(client):
    out = _post(client, "/winrate", {"prompt": QUESTION, "responses": GROUP, "order": "both"})
    n = len(GROUP)
    assert out["comparisons"] == n * (n - 1) // 2
    assert out["usage"]["engine_requests"] == n * (n - 1)
    valid = [w for w in out["win_rates"] if w is not None]
    if out["invalid"] == 0:
        assert sum(valid) == pytest.approx(n / 2)
        assert sum(out["advantages"]) == pytest.approx(0.0, abs=1e-6)
    for i in range(n):
        assert out["win_matrix"][i][i] is None
        for j in range(n):
            if i != j and out["win_matrix"][i][j] is not None:
                assert out["win_matrix"][i][j] + out["win_matrix"][j][i] == pytest.approx(1.0)


def test_winrate_permuting_the_group_permutes_the_win_rates(client):
    perm = [3, 0, 4, 2, 1]
    body = {"prompt": QUESTION, "order": "both", "soft": True}
    base = _post(client, "/winrate", {**body, "responses": GROUP})["win_rates"]
    permuted = _post(client, "/winrate", {**body, "responses": [GROUP[p] for p in perm]})["win_rates"]
    assert permuted == pytest.approx([base[p] for p in perm], abs=0.01)


def test_winrate_k_opponents(client):
    group = [*GROUP, "Paris is the capital.", "Berlin."]
    out = _post(
        client,
        "/winrate",
        {"prompt": QUESTION, "responses": group, "opponents": 2, "order": "random", "seed": 2},
    )
    assert out["comparisons"] == len(group) * 2 // 2  # k per response: N*k/2 pairs, not N*k
    compared = [sum(c is not None for c in row) for row in out["win_matrix"]]
    assert all(c <= 2 for c in compared)
    if out["invalid"] == 0:
        assert compared == [2] * len(group)


def test_pairwise_both_orders_inconsistent_rules_and_label_mass(client):
    """The README demo's pair (the small judge prefers a position, not a response) and the group:
    a pair whose verdict flips with the order is a tie by default, averaged or dropped on request."""
    items = [{"prompt": QUESTION, "response_a": GOOD, "response_b": r} for r in GROUP[1:]]
    items += [{"prompt": QUESTION, "response_a": r, "response_b": GOOD} for r in GROUP[1:]]
    body = {"items": items, "order": "both"}
    rules = {
        rule: _post(client, "/pairwise", {**body, "inconsistent": rule})["results"]
        for rule in ("average", "drop")
    }
    rules["tie"] = _post(client, "/pairwise", body)["results"]  # the default rule
    assert any(r["consistent"] is False for r in rules["tie"])  # this judge is position-biased
    for rule, results in rules.items():
        for r in results:  # each answer on its own: batches of other composition differ slightly
            assert 0.01 <= r["label_mass"] <= 1.0 + 1e-9  # above min_label_mass: it answered a label
            if r["consistent"]:
                assert r["inconsistent_rule"] is None and r["verdict"] in {"A", "B", "tie"}
            elif rule == "tie":
                assert (r["verdict"], r["p_a"], r["inconsistent_rule"]) == ("tie", 0.5, "tie")
            elif rule == "drop":
                assert (r["verdict"], r["p_a"], r["inconsistent_rule"]) == ("invalid", None, "drop")
                assert "changed with the order" in r["error"]
            else:
                assert r["inconsistent_rule"] == "average" and r["verdict"] != "invalid"
    group = {"prompt": QUESTION, "responses": GROUP, "order": "both"}
    drop = _post(client, "/winrate", {**group, "inconsistent": "drop"})
    assert drop["inconsistent_rule"] == "drop" and drop["inconsistent"] <= drop["invalid"]
    tie = _post(client, "/winrate", group)
    assert tie["inconsistent_rule"] == "tie" and tie["inconsistent"] <= tie["ties"]


def test_winrate_classifier_uses_n_forward_passes(client):
    out = _post(client, "/winrate", {"judge": "tiny-rm", "prompt": QUESTION, "responses": GROUP})
    n = len(GROUP)
    assert out["usage"]["engine_requests"] == n  # N scores, not N^2 comparisons
    assert out["comparisons"] == n * (n - 1) // 2
    assert sum(out["win_rates"]) == pytest.approx(n / 2)
    ranks = sorted(range(n), key=lambda i: out["scores"][i])
    assert [out["win_rates"][i] for i in ranks] == sorted(out["win_rates"])
    soft = _post(
        client, "/winrate", {"judge": "tiny-rm", "prompt": QUESTION, "responses": GROUP, "soft": True}
    )
    assert sum(soft["win_rates"]) == pytest.approx(n / 2)


def test_one_failing_item_is_reported_alone(client):
    too_long = "word " * 3000  # under the character limit, over the engine's 1024-token context
    items = [
        {"prompt": QUESTION, "response": GOOD},
        {"prompt": QUESTION, "response": too_long},
        {"prompt": QUESTION, "response": BAD},
    ]
    out = _post(client, "/score", {"judge": "tiny-rm", "items": items})
    ok1, bad, ok2 = out["results"]
    assert ok1["score"] is not None and ok2["score"] is not None
    assert bad["score"] is None and "context length" in bad["error"]
    pair = _post(
        client,
        "/pairwise",
        {
            "items": [
                {"prompt": QUESTION, "response_a": GOOD, "response_b": BAD},
                {"prompt": QUESTION, "response_a": too_long, "response_b": BAD},
            ]
        },
    )["results"]
    assert pair[0]["verdict"] != "invalid"
    assert pair[1]["verdict"] == "invalid" and pair[1]["p_a"] is None and "context length" in pair[1]["error"]


def test_winrate_with_a_failing_response_counts_it_invalid_not_tied(client):
    group = [GOOD, BAD, "word " * 3000]
    out = _post(client, "/winrate", {"judge": "tiny-rm", "prompt": QUESTION, "responses": group})
    assert out["invalid"] == 2 and out["win_rates"][2] is None and out["advantages"][2] is None
    assert out["win_rates"][0] + out["win_rates"][1] == pytest.approx(1.0)
    assert len(out["errors"]) == 2


def test_overload_answers_429_with_retry_after(client, server_url):
    import httpx

    items = [{"prompt": QUESTION, "response_a": GOOD, "response_b": BAD}] * 40  # 80 engine requests each
    # Reasoning keeps each admitted request in the engine for seconds, and the six are released
    # together, so the later ones find two requests (160 slots) in flight and one waiting (80, the
    # whole of limits.max_waiting_engine_requests) whatever the timing.
    body = {"items": items, "order": "both", "mode": "cot", "max_new_tokens": 8}
    start = threading.Barrier(6)

    def send(_):
        start.wait()
        return httpx.post(f"{server_url}/pairwise", json=body, timeout=300)

    with cf.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(send, range(6)))
    codes = [r.status_code for r in responses]
    assert 200 in codes and 429 in codes, codes
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.headers["Retry-After"] and rejected.json()["error"] == "overloaded"
    assert "limits.max_waiting_engine_requests" in rejected.json()["message"]
    assert codes.count(200) >= 3  # two admitted at once, and the one that waited its turn


def _metrics(client) -> dict[tuple[str, frozenset], float]:
    """Every sample /metrics serves, parsed as Prometheus parses it: (name, labels) -> value."""
    text = client.get("/metrics").text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _sum(samples: dict, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples that carry ``labels`` (and any others)."""
    return sum(v for (n, have), v in samples.items() if n == name and set(labels.items()) <= have)


def test_metrics_count_requests_verdicts_and_tokens(client):
    """What this test's own request added, read before and after it: earlier tests' traffic on the
    shared server does not count."""
    before = _metrics(client)
    out = _post(client, "/pairwise", {"items": [{"prompt": QUESTION, "response_a": GOOD, "response_b": BAD}]})
    after = _metrics(client)

    def delta(name: str, **labels: str) -> float:
        return _sum(after, name, **labels) - _sum(before, name, **labels)

    usage, [result] = out["usage"], out["results"]
    assert delta("referee_requests_total", route="/pairwise", status="200") == 1
    assert delta("referee_request_seconds_count", route="/pairwise") == 1
    assert delta("referee_verdicts_total", judge="smollm2") == 1
    assert delta("referee_verdicts_total", judge="smollm2", outcome=result["verdict"]) == 1
    assert delta("referee_tokens_total", judge="smollm2", kind="prompt") == usage["prompt_tokens"] > 0
    assert delta("referee_tokens_total", judge="smollm2", kind="completion") == usage["completion_tokens"]
    assert delta("referee_engine_requests_total", judge="smollm2") == usage["engine_requests"] > 0
    inflight = ("referee_inflight_engine_requests", frozenset())
    assert after[inflight] <= before[inflight]  # the request's engine work ended with its answer
