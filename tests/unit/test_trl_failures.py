"""What a completion the judge could not score becomes in TRL: ``referee.trl``'s ``on_failure``.

TRL 1.16 leaves a completion out only when every reward function returned ``None`` for it; with
several reward functions (sum_then_normalize) it ``nansum``s a ``None`` to 0, the worst win rate. The
trainer tests run TRL's real ``GRPOTrainer`` for one step on a tiny random policy, with a scripted
judge client, and read the advantages TRL computed.
"""

from __future__ import annotations

import math

import pytest

from referee.protocol import Usage, WinRateResponse
from referee.trl import RewardUnavailable, apply_on_failure, winrate_reward

# Each group of four: win rates 1, 1/2, 0 and one the judge could not give (all its comparisons invalid).
SCRIPTED = [1.0, 0.5, 0.0, None]


class ScriptedJudge:
    async def winrate(self, request):
        n = len(request.responses)
        rates = (SCRIPTED * n)[:n]
        return WinRateResponse(
            judge="scripted",
            win_rates=rates,
            advantages=[None] * n,
            win_matrix=[[None] * n for _ in range(n)],
            comparisons=n * (n - 1) // 2,
            ties=0,
            invalid=n - 1,
            usage=Usage(),
        )


# ---------------------------------------------------------------- the policies, exactly


def test_group_mean_fills_within_the_prompts_group_only():
    logged = {}
    out = apply_on_failure(
        [1.0, None, 0.0, None, None, float("nan")],
        ["p", "p", "p", "q", "q", "r"],
        "group_mean",
        "wr",
        {"log_metric": lambda k, v: logged.__setitem__(k, v)},
    )
    assert out == [1.0, 0.5, 0.0, None, None, None]  # q and r: nothing scored, so nothing to fill with
    assert logged == {"judge/wr/unscored": 4.0, "judge/wr/filled": 1.0, "judge/wr/masked": 3.0}


def test_mask_value_and_raise():
    assert apply_on_failure([1.0, None], ["p", "p"], "mask", "wr") == [1.0, None]
    assert apply_on_failure([1.0, None], ["p", "p"], 0.25, "wr") == [1.0, 0.25]
    with pytest.raises(RewardUnavailable, match="1 of 2"):
        apply_on_failure([1.0, None], ["p", "p"], "raise", "wr")
    assert apply_on_failure([1.0, 0.0], ["p", "p"], "raise", "wr") == [1.0, 0.0]


def test_the_default_is_group_mean_and_nonsense_is_refused():
    import inspect

    assert inspect.signature(winrate_reward).parameters["on_failure"].default == "group_mean"
    for bad in ("worst", math.nan, True):
        with pytest.raises(ValueError):
            winrate_reward(client_factory=ScriptedJudge, on_failure=bad)


# ---------------------------------------------------------------- TRL's real GRPOTrainer


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory, embedded_dir):
    from tests.model_factory import make_tiny_policy

    return make_tiny_policy(tmp_path_factory.mktemp("models") / "tiny-policy", embedded_dir)


def _rating(prompts, completions, **kwargs):
    """A second reward function (the README demo logs a rating at weight 0)."""
    return [0.0] * len(completions)


def _grpo_advantages(tiny_policy, tmp_path, funcs, weights) -> tuple[list[float], dict]:
    """One GRPO step with these reward functions: the advantages TRL computed, batch order, and the logs."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    captured = []

    class Capturing(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            captured.append(out["advantages"].tolist())
            return out

    config = GRPOConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=4,
        learning_rate=1e-6,
        beta=0.0,
        reward_weights=weights,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
    )
    prompts = [{"prompt": f"Name a colour ({k})."} for k in range(4)]
    trainer = Capturing(
        model=str(tiny_policy), reward_funcs=funcs, args=config, train_dataset=Dataset.from_list(prompts)
    )
    trainer.train()
    logs = {k: v for row in trainer.state.log_history for k, v in row.items()}
    return captured[0], logs


def test_trl_with_several_reward_functions_counts_a_masked_none_as_the_worst(tiny_policy, tmp_path):
    """Documents TRL: on_failure='mask' (a bare None) next to a weight-0 rating is a win rate of 0."""
    funcs = [winrate_reward(client_factory=ScriptedJudge, on_failure="mask", name="winrate"), _rating]
    adv, _ = _grpo_advantages(tiny_policy, tmp_path, funcs, [1.0, 0.0])
    for g in (0, 4):
        assert adv[g + 3] == pytest.approx(adv[g + 2]) and adv[g + 3] < 0  # the same as the 0 win rate


def test_group_mean_keeps_an_unscored_completion_out_of_the_signal(tiny_policy, tmp_path):
    funcs = [winrate_reward(client_factory=ScriptedJudge, name="winrate"), _rating]  # the default
    adv, logs = _grpo_advantages(tiny_policy, tmp_path, funcs, [1.0, 0.0])
    for g in (0, 4):
        assert adv[g + 3] == pytest.approx(0.0, abs=1e-6)  # neither rewarded nor punished
        assert adv[g] > 0 > adv[g + 2] and adv[g + 1] == pytest.approx(0.0, abs=1e-6)
    assert logs["judge/winrate/unscored"] == 2.0 and logs["judge/winrate/filled"] == 2.0


def test_mask_with_one_reward_function_is_trls_leave_out(tiny_policy, tmp_path):
    funcs = [winrate_reward(client_factory=ScriptedJudge, on_failure="mask", name="winrate")]
    adv, logs = _grpo_advantages(tiny_policy, tmp_path, funcs, [1.0])
    for g in (0, 4):
        assert adv[g + 3] == 0.0  # TRL: every reward function returned None -> advantage 0
        assert adv[g] == pytest.approx(-adv[g + 2]) and adv[g] > 0  # baseline of the three scored
    assert logs["judge/winrate/masked"] == 2.0


def test_raise_stops_the_step(tiny_policy, tmp_path):
    funcs = [winrate_reward(client_factory=ScriptedJudge, on_failure="raise", name="winrate"), _rating]
    with pytest.raises(RewardUnavailable, match="could not score 2 of 8"):
        _grpo_advantages(tiny_policy, tmp_path, funcs, [1.0, 0.0])
