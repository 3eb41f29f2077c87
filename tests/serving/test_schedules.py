"""Sparse group schedules with Bradley-Terry estimates, through the real server."""

from __future__ import annotations

import math


def test_a_sparse_schedule_with_bradley_terry_estimates(client):
    responses = ["Paris.", "Lyon.", "It is Paris, the capital.", "I like turtles.", "Marseille?"]
    body = {
        "prompt": "What is the capital of France?",
        "responses": responses,
        "opponents": 2,
        "order": "both",
    }
    observed = client.post("/winrate", json=body).json()
    fitted = client.post("/winrate", json={**body, "estimate": "bradley_terry"}).json()
    assert observed["comparisons"] == fitted["comparisons"] == 5  # 5 x 2 / 2 pairs, not 10
    assert fitted["usage"]["engine_requests"] + fitted["usage"]["cached"] == 10
    assert observed["win_matrix"] == fitted["win_matrix"]  # the same comparisons, estimated differently
    strengths, rates = fitted["scores"], fitted["win_rates"]
    assert len(strengths) == 5 and abs(sum(strengths)) < 1e-6  # log strengths, mean 0
    assert all(r is not None and 0 < r < 1 for r in rates)
    assert math.isclose(sum(rates), len(rates) / 2, abs_tol=1e-6)  # expected wins sum to n/2
    order = sorted(range(5), key=lambda k: strengths[k])
    assert [rates[k] for k in order] == sorted(rates)  # the estimate follows the fitted strengths
