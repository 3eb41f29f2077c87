"""Reward design against the real engines of the shared test server: an ensemble of the LLM judge
and a reward model, shaping against a reference, listwise and follow-up judges, a multi-objective
reward model. Each option's rule is checked exactly with scripted engines in
``tests/unit/test_reward_design.py``.
"""

from __future__ import annotations

import pytest

from referee.rewards import bradley_terry
from tests.support import QUESTION, RECOMPUTE_TOLERANCE, served_dtype


def test_served_ensemble_of_an_llm_judge_and_a_reward_model(client):
    """The shared server's `panel`: the embedded LLM judge and the tiny reward model, one request."""
    info = {j["name"]: j for j in client.get("/judges").json()["judges"]}["panel"]
    assert info["kind"] == "ensemble" and info["routes"] == ["score", "pairwise", "winrate"]
    a, b = "Paris is the capital of France.", "I think it is Lyon, or maybe Nice."
    item = {"prompt": QUESTION, "response_a": a, "response_b": b}
    options = {"order": "single", "cache": False}
    together = client.post("/pairwise", json={"judge": "panel", "items": [item], **options}).json()
    alone = [
        client.post("/pairwise", json={"judge": name, "items": [item], **options}).json()["results"][0]
        for name in ("smollm2", "tiny-rm")
    ]
    result = together["results"][0]
    assert together["usage"]["engine_requests"] == 1 + 2  # one verdict + two reward-model scores
    # the panel's P(A) is the mean of its members' and its uncertainty their spread: with the reward
    # model's (float32, deterministic) P(A) known, the LLM judge's inside the panel follows exactly,
    # and equals its P(A) alone to the precision its engine repeats itself (RECOMPUTE_TOLERANCE)
    p_llm, p_rm = alone[0]["p_a"], alone[1]["p_a"]
    p_llm_in_panel = 2 * result["p_a"] - p_rm
    assert result["uncertainty"] == pytest.approx(abs(p_llm_in_panel - p_rm) / 2, abs=1e-6)
    assert p_llm_in_panel == pytest.approx(p_llm, abs=RECOMPUTE_TOLERANCE[served_dtype(client, "smollm2")])
    scored = client.post(
        "/score", json={"judge": "panel", "items": [{"prompt": QUESTION, "response": a}], "cache": False}
    ).json()["results"][0]
    assert set(scored["members"]) == {"smollm2", "tiny-rm"} and scored["uncertainty"] is not None
    assert scored["score"] == pytest.approx(sum(scored["members"].values()) / 2)
    group = client.post(
        "/winrate",
        json={"judge": "panel", "prompt": QUESTION, "responses": [a, b, a + " Yes."], "order": "both"},
    ).json()
    assert group["invalid"] + sum(r is not None for r in group["win_rates"]) >= 1
    assert group["usage"]["engine_requests"] > 0


def test_served_shaping_matches_the_raw_scores(client):
    a, ref = "Paris is the capital of France.", "The capital of France is Paris."
    raw = client.post(
        "/score",
        json={
            "judge": "tiny-rm",
            "items": [{"prompt": QUESTION, "response": t} for t in (a, ref)],
            "cache": False,
        },
    ).json()["results"]
    shaped = client.post(
        "/score",
        json={
            "judge": "tiny-rm",
            "transform": "par",
            "cache": False,
            "items": [{"prompt": QUESTION, "response": a, "reference": ref}],
        },
    ).json()["results"][0]
    assert shaped["raw_score"] == pytest.approx(raw[0]["score"], abs=1e-5)
    assert shaped["reference_score"] == pytest.approx(raw[1]["score"], abs=1e-5)
    assert shaped["score"] == pytest.approx(bradley_terry(raw[0]["score"], raw[1]["score"]), abs=1e-5)
    bad = client.post(
        "/score",
        json={"judge": "tiny-rm", "transform": "par", "items": [{"prompt": QUESTION, "response": a}]},
    )
    assert bad.status_code == 422 and "reference" in bad.json()["message"]


def test_served_listwise_and_followup(client):
    """The embedded judge ranks a group in one call (its ranking may be invalid, never guessed), and
    the follow-up judge, on the same engine, prefers an answer to a non-answer."""
    responses = ["Paris.", "I do not know.", "The capital of France is Paris."]
    out = client.post(
        "/winrate",
        json={
            "judge": "smollm2",
            "prompt": QUESTION,
            "responses": responses,
            "schedule": "listwise",
            "cache": False,
        },
    ).json()
    assert out["usage"]["engine_requests"] == 2 and out["comparisons"] == 3
    for ranking in out["rankings"]:
        assert ranking is None or sorted(ranking) == [0, 1, 2]
    assert out["invalid"] == 0 or out["errors"]
    scored = client.post(
        "/score",
        json={
            "judge": "followup",
            "cache": False,
            "items": [
                {"prompt": QUESTION, "response": r}
                for r in ("The capital of France is Paris.", "Bananas are yellow.")
            ],
        },
    ).json()
    assert scored["usage"]["engine_requests"] == 2 * 4  # two positive and two negative follow-ups each
    answer, off_topic = (r["score"] for r in scored["results"])
    assert answer > off_topic
    both = client.post(
        "/score",
        json={
            "judge": "panel-pointwise",
            "cache": False,
            "items": [{"prompt": QUESTION, "response": "Paris."}],
        },
    ).json()["results"][0]
    assert set(both["members"]) == {"followup", "tiny-rm"} and both["uncertainty"] >= 0


def test_served_multi_objective_reward_model(client):
    """The tiny five-objective model on vLLM: every objective named and returned, equal weights by
    default, one objective or other weights on request."""
    info = {j["name"]: j for j in client.get("/judges").json()["judges"]}["tiny-objectives"]
    names = info["objectives"]
    assert names == ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]
    items = [{"prompt": QUESTION, "response": r} for r in ("Paris.", "It is Paris, on the Seine.")]
    out = client.post("/score", json={"judge": "tiny-objectives", "items": items, "cache": False}).json()
    for r in out["results"]:
        assert list(r["objectives"]) == names
        assert r["score"] == pytest.approx(sum(r["objectives"].values()) / 5, abs=1e-5)
    assert out["usage"]["engine_requests"] == 2  # one forward pass gives every objective
    one = client.post(
        "/score", json={"judge": "tiny-objectives", "items": items, "objective": "verbosity", "cache": False}
    ).json()["results"]
    assert [r["score"] for r in one] == pytest.approx(
        [r["objectives"]["verbosity"] for r in out["results"]], abs=1e-5
    )
    bad = client.post("/score", json={"judge": "tiny-objectives", "items": items, "objective": "honesty"})
    assert bad.status_code == 400 and "helpfulness" in bad.json()["message"]
    group = client.post(
        "/winrate",
        json={
            "judge": "tiny-objectives",
            "prompt": QUESTION,
            "responses": ["Paris.", "Lyon.", "It is Paris."],
            "weights": {"correctness": 1.0},
        },
    ).json()
    assert group["usage"]["engine_requests"] == 3 and len(group["scores"]) == 3


def test_served_classify_returns_every_objective_as_vllm_does(client):
    """vLLM's /classify shape for a multi-output model: every label's value, a softmax by default."""
    raw = client.post(
        "/classify",
        json={"model": "tiny-objectives", "input": "Paris is the capital.", "use_activation": False},
    ).json()["data"][0]
    assert raw["num_classes"] == 5 and len(raw["probs"]) == 5
    soft = client.post(
        "/classify", json={"model": "tiny-objectives", "input": "Paris is the capital."}
    ).json()
    probs = soft["data"][0]["probs"]
    assert sum(probs) == pytest.approx(1.0) and all(0 < p < 1 for p in probs)
    top = max(range(5), key=lambda k: raw["probs"][k])
    assert (
        soft["data"][0]["label"]
        == raw["label"]
        == ["helpfulness", "correctness", "coherence", "complexity", "verbosity"][top]
    )
