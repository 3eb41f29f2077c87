"""Engine primitives on the real vLLM CPU engine, checked against transformers on the same token ids:
every raw output of a multi-objective reward model (``classify_all``, ``output_labels``) and the
log-probability of prompt tokens (``prompt_logprobs``: follow-up likelihood as reward).

The engines are started in this process (no server), small: a 5-objective tiny reward model, the
tiny one-label reward model and the embedded SmolLM2 judge with prefix caching on, as served.
"""

from __future__ import annotations

import asyncio
import math

import pytest
import pytest_asyncio

from reward_server.engine import Engine
from reward_server.settings import EngineSettings
from tests.model_factory import OBJECTIVES

CONVERSATIONS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of France?", "I like turtles."),
    (
        "Write a haiku about rain.",
        "Soft rain on the roof / the garden drinks in silence / puddles hold the sky",
    ),
]

# Longer than two of the CPU build's 128-token KV-cache blocks, so that the prefix cache holds some.
LONG = (
    "How do plants make their food?",
    "Plants make their food by photosynthesis. In the chloroplasts of their leaves, the green pigment "
    "chlorophyll absorbs sunlight. The plant takes in carbon dioxide from the air through small pores "
    "called stomata, and water from the soil through its roots, which travels up the stem in the xylem. "
    "Using the energy of the light, the plant splits water molecules, releasing oxygen into the air, and "
    "combines the hydrogen with carbon dioxide to build glucose, a sugar. The glucose is used at once for "
    "energy through respiration, turned into starch to be stored in roots, seeds and tubers, or built "
    "into cellulose for the cell walls that give the plant its structure. Some of it becomes proteins "
    "and fats when combined with nitrogen and other minerals taken up from the soil. This is why plants "
    "need light, water, air and healthy soil to grow, and why nearly every food chain on Earth starts "
    "with them: animals that eat plants, and the animals that eat those animals, all live on energy the "
    "plants first captured from the sun. Without photosynthesis there would also be almost no oxygen in "
    "the air for us to breathe.",
)

# Follow-up likelihood (Zhang et al. 2024): how likely the user's next turn is after the response.
THANKS = "Thanks, that answers my question."
NOT_ANSWERED = "That doesn't answer my question."
# A helpful answer first, then an off-topic one and a refusal.
QUESTIONS = [
    (
        "What is the capital of France?",
        ["The capital of France is Paris.", "I like turtles.", "I don't know."],
    ),
    (
        "How many legs does a spider have?",
        ["A spider has eight legs.", "Bananas are yellow.", "I can't help with that."],
    ),
    ("What is 2 + 2?", ["2 + 2 = 4.", "The weather is nice today.", "I'm not sure."]),
]


def _conversation(prompt: str, response: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _follow_up_ids(engine: Engine, prompt: str, response: str, follow_up: str) -> tuple[list[int], int]:
    """The conversation with the user's follow-up turn appended, and where that turn starts."""
    before = engine.chat_ids(_conversation(prompt, response), generation_prompt=False)
    ids = engine.chat_ids(
        [*_conversation(prompt, response), {"role": "user", "content": follow_up}], generation_prompt=False
    )
    assert ids[: len(before)] == before  # the follow-up extends the conversation's tokens
    return ids, len(before)


@pytest_asyncio.fixture(scope="module")
async def engines(embedded_dir, tiny_classifier_dir, tiny_objectives_dir):
    small = dict(max_model_len=512, kv_cache_memory_gib=0.0625)
    started: dict[str, Engine] = {}
    try:
        started["objectives"] = Engine.start(
            str(tiny_objectives_dir), EngineSettings(dtype="float32", **small), "pooling"
        )
        started["rm"] = Engine.start(
            str(tiny_classifier_dir), EngineSettings(dtype="float32", **small), "pooling"
        )
        # the judge as served: dtype auto (this machine's rule), prefix caching on by default
        started["judge"] = Engine.start(
            "embedded:smollm2", EngineSettings(max_model_len=1024, kv_cache_memory_gib=0.25), "generate"
        )
        yield started
    finally:
        for engine in started.values():
            engine.shutdown()


@pytest.fixture(scope="module")
def judge_reference(embedded_dir):
    """Sum of log P(ids[i] | ids[:i]) for i >= start, from transformers in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32).eval()

    def reference(ids: list[int], start: int) -> float:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor(ids[start:])
        return float(logprobs[start - 1 : len(ids) - 1].gather(1, targets[:, None]).sum())

    return reference


def _classifier_reference(model_dir, ids_list: list[list[int]]) -> list[list[float]]:
    """Every output at the last token, from transformers in float32 (the score head applied to the
    final hidden state; the model's own pooling looks for the last non-pad token, and SmolLM2's pad
    token is ``<|im_end|>``, which chat texts contain)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [
            model.score(model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]).tolist()
            for ids in ids_list
        ]


# ------------------------------------------------------------------ classify_all, output_labels


async def test_classify_all_returns_every_raw_output(engines, tiny_objectives_dir):
    engine = engines["objectives"]
    ids_list = [engine.chat_ids(_conversation(p, r), generation_prompt=False) for p, r in CONVERSATIONS]
    served = await asyncio.gather(*(engine.classify_all(ids, priority=1) for ids in ids_list))
    reference = _classifier_reference(tiny_objectives_dir, ids_list)
    for values, expected in zip(served, reference, strict=True):
        assert len(values) == len(OBJECTIVES) and all(math.isfinite(v) for v in values)
        assert max(abs(a - b) for a, b in zip(values, expected, strict=True)) <= 1e-3, (values, expected)
    # the objectives differ from each other and between texts (so the check above can tell them apart)
    for values in reference:
        assert max(values) - min(values) > 0.1
    for i in range(len(reference)):
        for j in range(i + 1, len(reference)):
            assert max(abs(a - b) for a, b in zip(reference[i], reference[j], strict=True)) > 0.05
    # vLLM's own default for several labels is a softmax across them: that is what classify_all avoids
    default = (await engine._classify_outputs(ids_list[0], True, 0, None)).reshape(-1).tolist()
    exp = [math.exp(v) for v in served[0]]
    assert default == pytest.approx([e / sum(exp) for e in exp], abs=1e-5)
    assert sum(served[0]) != pytest.approx(1.0, abs=1e-3)


async def test_classify_all_is_deterministic_and_salted(engines):
    engine = engines["objectives"]
    ids = engine.chat_ids(_conversation(*CONVERSATIONS[0]), generation_prompt=False)
    first = await engine.classify_all(ids)
    again, salted = await asyncio.gather(engine.classify_all(ids), engine.classify_all(ids, cache_salt="t"))
    assert again == pytest.approx(first, abs=1e-5) and salted == pytest.approx(first, abs=1e-5)


def test_output_labels(engines):
    assert engines["objectives"].output_labels == list(OBJECTIVES)
    assert engines["rm"].output_labels is None  # one output, transformers' default name LABEL_0
    assert engines["judge"].output_labels is None  # a generative engine has no classifier outputs


async def test_single_output_classify_unchanged(engines, tiny_classifier_dir):
    rm = engines["rm"]
    ids_list = [rm.chat_ids(_conversation(p, r), generation_prompt=False) for p, r in CONVERSATIONS]
    reference = [values[0] for values in _classifier_reference(tiny_classifier_dir, ids_list)]
    scores = await asyncio.gather(*(rm.classify(ids) for ids in ids_list))
    assert scores == pytest.approx(reference, abs=1e-3)
    assert any(not 0.0 < s < 1.0 for s in reference)  # raw logits, which a sigmoid would change
    everything = await asyncio.gather(*(rm.classify_all(ids) for ids in ids_list))
    assert everything == [[pytest.approx(s, abs=1e-6)] for s in scores]
    squashed = await rm.classify(ids_list[0], activation=True)
    assert squashed == pytest.approx(1 / (1 + math.exp(-scores[0])), abs=1e-5)
    with pytest.raises(ValueError, match="5 outputs"):  # a reward model's score has one output
        await engines["objectives"].classify(ids_list[0])


# ------------------------------------------------------------------ prompt_logprobs


async def test_prompt_logprobs_match_transformers(engines, judge_reference):
    judge = engines["judge"]
    # float32 where the CPU has no native bf16 (this rule is reward_server.hardware's)
    per_token = 1e-3 if judge.dtype == "float32" else 0.1
    cases = [_follow_up_ids(judge, p, r, THANKS) for p, r in CONVERSATIONS[:2]]
    cases.append((cases[0][0], 1))  # the whole prompt after its first token
    served = await asyncio.gather(
        *(judge.prompt_logprobs(ids, start=start, priority=2) for ids, start in cases)
    )
    for (total, count), (ids, start) in zip(served, cases, strict=True):
        assert count == len(ids) - start
        expected = judge_reference(ids, start)
        assert math.isfinite(total) and total < 0
        assert abs(total - expected) <= max(1e-2, per_token * count), (judge.dtype, total, expected)


async def test_prompt_logprobs_are_not_cut_short_by_the_prefix_cache(engines, judge_reference):
    """With prefix caching on, vLLM computes prompt log-probabilities only for the tokens it prefills;
    it skips reading the cache for requests that ask for them, so repeated calls see every token."""
    from vllm import SamplingParams

    judge = engines["judge"]
    assert judge._llm.vllm_config.cache_config.enable_prefix_caching
    ids, start = _follow_up_ids(judge, *LONG, THANKS)
    block = judge._llm.vllm_config.cache_config.block_size
    assert start > block  # the follow-up starts past the first cached block
    first = await judge.prompt_logprobs(ids, start=start)
    # a plain request now reads the prompt's full blocks from the cache ...
    await judge.complete(ids, max_tokens=1)
    plain = await _final(judge, ids, SamplingParams(max_tokens=1))
    assert plain.num_cached_tokens >= block
    # ... a prompt-logprobs request prefills it all, alone or beside requests sharing its prefix
    again = await asyncio.gather(
        judge.prompt_logprobs(ids, start=start),
        judge.prompt_logprobs(ids, start=start),
        judge.complete(ids, max_tokens=2),
        judge.prompt_logprobs(_follow_up_ids(judge, *LONG, NOT_ANSWERED)[0], start=start),
        judge.prompt_logprobs(ids, start=1),
    )
    per_token = 1e-3 if judge.dtype == "float32" else 0.1
    for total, count in (again[0], again[1]):  # every token again, each to the engine's precision
        assert count == first[1]
        assert total == pytest.approx(first[0], abs=1e-4 if judge.dtype == "float32" else 1e-2 * count)
    for (total, count), begin in ((first, start), (again[4], 1)):
        expected = judge_reference(ids, begin)
        assert abs(total - expected) <= max(1e-2, per_token * count), (judge.dtype, begin, total, expected)
    direct = await _final(judge, ids, SamplingParams(max_tokens=1, prompt_logprobs=0))
    assert direct.num_cached_tokens == 0 and all(p for p in direct.prompt_logprobs[1:])


async def _final(engine: Engine, ids: list[int], params):
    import uuid

    from reward_server.engine import _last, _prompt

    return await _last(engine._llm.generate(_prompt(ids, None), params, request_id=uuid.uuid4().hex))


async def test_follow_up_likelihood_ranks_helpful_answers(engines):
    """The follow-up contrast log P(thanks) - log P(not answered) ranks the helpful answer above an
    off-topic one and a refusal for every question. (The positive follow-up alone does not rank them
    reliably with this small judge: its likelihood also depends on how the answer reads.)"""
    judge = engines["judge"]
    jobs, keys = [], []
    for q, (prompt, answers) in enumerate(QUESTIONS):
        for a, answer in enumerate(answers):
            for follow_up in (THANKS, NOT_ANSWERED):
                ids, start = _follow_up_ids(judge, prompt, answer, follow_up)
                jobs.append(judge.prompt_logprobs(ids, start=start))
                keys.append((q, a, follow_up))
    scores = {key: total for key, (total, _) in zip(keys, await asyncio.gather(*jobs), strict=True)}
    # In float32 the helpful answer leads on every question. In bfloat16 the closest question's lead
    # (about 0.2 nats in float32) is within the engine's rounding: there it may not lead by more.
    slack = 0.0 if judge.dtype == "float32" else 0.5
    leads = []
    for q, (_, answers) in enumerate(QUESTIONS):
        contrast = [scores[q, a, THANKS] - scores[q, a, NOT_ANSWERED] for a in range(len(answers))]
        leads.append(contrast[0] - max(contrast[1:]))
        assert leads[-1] > -slack, (QUESTIONS[q][0], contrast)
    assert sum(leads) > 0, leads
    # the refusals draw "That doesn't answer my question." much more than the helpful answers do
    for q in range(len(QUESTIONS)):
        assert scores[q, 2, NOT_ANSWERED] > scores[q, 0, NOT_ANSWERED] + 1.0


async def test_prompt_logprobs_rejects_bad_requests(engines):
    judge = engines["judge"]
    ids, _ = _follow_up_ids(judge, *CONVERSATIONS[0], THANKS)
    for start in (0, -1, len(ids), len(ids) + 3):
        with pytest.raises(ValueError, match="out of range"):
            await judge.prompt_logprobs(ids, start=start)
    with pytest.raises(ValueError, match="generative"):
        await engines["rm"].prompt_logprobs(ids, start=1)
