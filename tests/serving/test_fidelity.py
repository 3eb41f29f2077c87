"""The served classifier score is the model's raw logit: compare with transformers on the same model."""

import pytest

from tests.support import native_bf16

BF16_SKIP = pytest.mark.skipif(
    not native_bf16(),
    reason="this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 would run on a slow reference path, "
    "so the test server does not load a bf16 judge here; the float32 check still runs",
)

TEXTS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of France?", "I like turtles."),
    (
        "Write a haiku about rain.",
        "Soft rain on the roof / the garden drinks in silence / puddles hold the sky",
    ),
    ("How do I sort a list in Python?", "Use sorted(xs) for a new list or xs.sort() in place."),
    ("Tell me a joke.", "Why did the scarecrow win an award? He was outstanding in his field."),
]


def _reference_scores(model_dir, dtype_name: str) -> list[float]:
    """Scores from transformers, on the token ids the server builds (the chat template, no extra BOS)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, dtype=getattr(torch, dtype_name)
    ).eval()
    scores = []
    with torch.no_grad():
        for prompt, response in TEXTS:
            conversation = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            text = tokenizer.apply_chat_template(conversation, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
            scores.append(float(model(input_ids=ids).logits[0, 0]))
    return scores


@pytest.mark.parametrize(
    ("judge", "dtype", "tolerance"),
    [("tiny-rm", "float32", 1e-3), pytest.param("tiny-rm-bf16", "bfloat16", 0.02, marks=BF16_SKIP)],
)
def test_served_scores_match_transformers(client, tiny_classifier_dir, judge, dtype, tolerance):
    reference = _reference_scores(tiny_classifier_dir, dtype)
    items = [{"prompt": p, "response": r} for p, r in TEXTS]
    out = client.post("/score", json={"judge": judge, "items": items}).json()
    served = [r["score"] for r in out["results"]]
    worst = max(abs(a - b) for a, b in zip(served, reference, strict=True))
    assert worst <= tolerance, (served, reference)
    assert len({round(s, 2) for s in reference}) == len(TEXTS)  # the check can tell the texts apart
    assert any(not 0.0 < s < 1.0 for s in reference)  # ...and would catch a sigmoid applied to them
