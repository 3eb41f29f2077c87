"""A trainer worker: GRPO with TRL on a policy model, rewards from the shared referee judge.

Reads top to bottom: build the prompt dataset, build reward functions from the SDK (win rate by
default, reaching the judge through Redis), run TRL's ``GRPOTrainer``, and record every logged step
as a JSONL line plus a reward-curve picture at the end.

Simplifications, on purpose: one process per job on the CPU (or one GPU through TRL's own
settings); prompts are single user turns; no checkpoints are saved (``save_strategy="no"``).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from referee.client import AsyncReferee
from referee.embedded import resolve_model
from referee.queue import QueueReferee
from referee.trl import preference_reward, score_reward, winrate_reward

from .settings import TrainSettings

logger = logging.getLogger(__name__)

# Keys of TRL's logs that the job's metrics keep (when present).
_KEEP = ("reward", "reward_std", "loss", "kl", "entropy", "completions/mean_length", "learning_rate")


def load_prompts(settings: TrainSettings) -> list[dict[str, Any]]:
    rows = []
    with open(settings.prompts) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                item = {"prompt": [{"role": "user", "content": row["prompt"]}]}
                for r in settings.rewards:
                    if r.kind == "preference":
                        item[r.reference_column] = row[r.reference_column]
                rows.append(item)
            if settings.max_prompts and len(rows) >= settings.max_prompts:
                break
    if not rows:
        raise ValueError(f"no prompts in {settings.prompts}")
    return rows


def build_rewards(settings: TrainSettings) -> tuple[list, list[float]]:
    # The key goes only to the client (as a header, or as the tenant's Redis password); it is never
    # logged nor written to the job's files.
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    if settings.transport == "queue":

        def factory():
            return QueueReferee(
                settings.redis_url,
                job_id=settings.job_id,
                prefix=settings.redis_prefix,
                timeout=settings.judge_timeout_s,
                api_key=api_key,
                tenant=settings.tenant,
            )
    else:

        def factory():
            return AsyncReferee(settings.server_url, api_key=api_key, job_id=settings.job_id)

    funcs = []
    for k, r in enumerate(settings.rewards):
        name = r.kind if k == 0 else f"{r.kind}_{k}"
        if r.kind == "winrate":
            funcs.append(
                winrate_reward(
                    client_factory=factory,
                    judge=r.judge,
                    mode=r.mode,
                    order=r.order,
                    opponents=r.opponents,
                    soft=r.soft,
                    rubric=r.rubric,
                    inconsistent=r.inconsistent,
                    on_failure=r.on_failure,
                    name=name,
                )
            )
        elif r.kind == "score":
            funcs.append(
                score_reward(
                    client_factory=factory,
                    judge=r.judge,
                    rubric=r.rubric,
                    on_failure=r.on_failure,
                    name=name,
                )
            )
        else:
            funcs.append(
                preference_reward(
                    client_factory=factory,
                    judge=r.judge,
                    mode=r.mode,
                    order=r.order,
                    rubric=r.rubric,
                    reference_column=r.reference_column,
                    inconsistent=r.inconsistent,
                    on_failure=r.on_failure,
                    name=name,
                )
            )
    return funcs, [r.weight for r in settings.rewards]


def read_report(settings: TrainSettings):
    """The judge's health report of this job (``referee.health``), by the job's own transport; None
    (logged) when it cannot be read: telemetry never stops training."""
    import asyncio

    api_key = settings.api_key.get_secret_value() if settings.api_key else None

    async def read():
        if settings.transport == "queue":
            async with QueueReferee(
                settings.redis_url,
                job_id=settings.job_id,
                prefix=settings.redis_prefix,
                api_key=api_key,
                tenant=settings.tenant,
            ) as q:
                return await q.report()
        async with AsyncReferee(settings.server_url, api_key=api_key, job_id=settings.job_id) as ref:
            return await ref.report()

    try:
        return asyncio.run(read())
    except Exception as exc:
        logger.warning("[%s] the judge's health report could not be read: %s", settings.job_id, exc)
        return None


# What each logged step keeps of the report (the judge's totals so far), under judge/health/.
_HEALTH = (
    "tie_rate",
    "order_flip_rate",
    "first_position_win_rate",
    "flat_group_rate",
    "tiny_spread_group_rate",
    "mean_group_std",
    "longer_win_rate",
    "length_reward_correlation",
)


_ROUTES = {"winrate": "winrate", "preference": "pairwise", "score": "score"}


def health_row(report, settings: TrainSettings) -> dict:
    """A step's health figures: those of what the first reward asks (win rates by default), and the
    count of every warning."""
    if report is None or not report.judges:
        return {}
    first = settings.rewards[0]
    route = _ROUTES.get(first.kind)
    sections = [
        s for s in report.judges if s.route == route and (first.judge is None or s.judge == first.judge)
    ]
    if not sections:
        return {"judge/health/warnings": len(report.warnings)}
    totals = sections[0].totals
    row = {f"judge/health/{k}": getattr(totals, k) for k in _HEALTH}
    row["judge/health/warnings"] = len(report.warnings)
    return row


def _text(completion) -> str:
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content", "")) for m in completion)  # conversational: the turns' text


class CompletionLog:
    """Writes each reward call's groups (one prompt's completions) to ``completions.jsonl`` and
    counts duplicate completions inside groups: the share that the judge answers without judging
    twice (identical responses of a group are judged once)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.write_text("")
        self.calls = self.completions = self.duplicates = 0

    def record(self, prompts, completions) -> None:
        groups: dict[str, list[str]] = {}
        for prompt, completion in zip(prompts, completions, strict=True):
            groups.setdefault(json.dumps(prompt), []).append(_text(completion))
        with self.path.open("a") as f:
            for prompt, texts in groups.items():
                self.completions += len(texts)
                self.duplicates += len(texts) - len(set(texts))
                row = {"call": self.calls, "prompt": json.loads(prompt), "completions": texts}
                f.write(json.dumps(row) + "\n")
        self.calls += 1

    def wrap(self, func):
        """``func`` (a TRL reward, async or not) that records what it is asked first."""
        if inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(type(func).__call__):

            async def reward(prompts, completions, **kwargs):
                self.record(prompts, completions)
                return await func(prompts=prompts, completions=completions, **kwargs)
        else:

            def reward(prompts, completions, **kwargs):
                self.record(prompts, completions)
                return func(prompts=prompts, completions=completions, **kwargs)

        reward.__name__ = func.__name__  # what TRL logs the reward under
        return reward

    @property
    def duplicate_rate(self) -> float | None:
        return self.duplicates / self.completions if self.completions else None


def _callback_class():
    from transformers import TrainerCallback

    class JobReport(TrainerCallback):
        """Writes each logged step to metrics.jsonl and reports progress."""

        def __init__(self, settings: TrainSettings, out_dir: Path) -> None:
            self.settings = settings
            self.path = out_dir / "metrics.jsonl"
            self.path.write_text("")
            self.start = time.monotonic()
            self.rows: list[dict] = []
            self.report = None  # the judge's latest health report of this job
            self.warned: set[str] = set()
            self.progress = None
            if sys.stdout.isatty():
                from rich.progress import Progress

                self.progress = Progress(transient=False)
                self.task = self.progress.add_task(f"GRPO {settings.job_id}", total=settings.max_steps)
                self.progress.start()

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "reward" not in logs:
                return
            row = {
                "job_id": self.settings.job_id,
                "step": state.global_step,
                "elapsed_s": round(time.monotonic() - self.start, 2),
            }
            for key, value in logs.items():
                if key in _KEEP or key.startswith(("rewards/", "judge/")):
                    row[key] = None if isinstance(value, float) and math.isnan(value) else value
            if self.settings.judge_report:
                self.report = read_report(self.settings) or self.report
                row.update(health_row(self.report, self.settings))
                for warning in self.report.warnings if self.report else ():
                    if warning not in self.warned:  # each warning once, when it first appears
                        self.warned.add(warning)
                        print(f"[{self.settings.job_id}] judge health: {warning}", flush=True)
            self.rows.append(row)
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            summary = (
                f"step {row['step']}/{self.settings.max_steps} reward {row['reward']:.3f} "
                f"judge {row.get('judge/latency_s') or 0:.2f}s ties {row.get('judge/ties', 0):.0f} "
                f"invalid {row.get('judge/invalid', 0):.0f}"
            )
            if self.progress is not None:
                self.progress.update(
                    self.task, completed=state.global_step, description=f"{self.settings.job_id}: {summary}"
                )
            else:
                print(f"[{self.settings.job_id}] {summary}", flush=True)

        def on_train_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.stop()

    return JobReport


_PLOTTED = ("tie_rate", "order_flip_rate", "flat_group_rate", "tiny_spread_group_rate", "longer_win_rate")


def plot_rewards(rows: list[dict], path: Path, title: str) -> None:
    """One panel per reward function (its batch mean, with the within-group win-rate spread)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(
        {k.split("/")[1] for r in rows for k in r if k.startswith("rewards/") and k.endswith("/mean")}
    )
    health = [k for k in _PLOTTED if any(r.get(f"judge/health/{k}") is not None for r in rows)]
    panels = max(1, len(names)) + bool(health)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.5), squeeze=False)
    if health:  # beside the rewards: whether they carry signal (referee.health)
        ax = axes[0][-1]
        for k in health:
            ax.plot(
                [r["step"] for r in rows], [r.get(f"judge/health/{k}") for r in rows], marker=".", label=k
            )
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("step")
        ax.set_title("judge health (recent windows)")
        ax.legend(loc="best", fontsize=7)
    steps = [r["step"] for r in rows]
    for ax, name in zip(axes[0], names, strict=False):
        mean = [r.get(f"rewards/{name}/mean") for r in rows]
        std = [r.get(f"rewards/{name}/std") or 0.0 for r in rows]
        ax.plot(steps, mean, marker="o", label=f"{name}: batch mean")
        ax.fill_between(
            steps,
            [m - s for m, s in zip(mean, std, strict=True)],
            [m + s for m, s in zip(mean, std, strict=True)],
            alpha=0.2,
            label="± std",
        )
        if name.startswith("winrate") and any(r.get("judge/winrate_spread") is not None for r in rows):
            ax.plot(
                steps,
                [r.get("judge/winrate_spread") for r in rows],
                marker="x",
                linestyle="--",
                label="within-group spread",
            )
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(settings: TrainSettings) -> Path:
    """Train one job; returns its output folder (metrics.jsonl, reward_curve.png, summary.json)."""
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    out_dir = settings.output_dir / settings.job_id
    out_dir.mkdir(parents=True, exist_ok=True)
    funcs, weights = build_rewards(settings)
    log = None
    if settings.log_completions:
        log = CompletionLog(out_dir / "completions.jsonl")
        funcs[0] = log.wrap(funcs[0])
    micro = settings.micro_batch_prompts
    if settings.prompts_per_step % micro:
        raise ValueError("prompts_per_step must be a multiple of micro_batch_prompts")
    config = GRPOConfig(
        output_dir=str(out_dir),
        max_steps=settings.max_steps,
        # A step generates prompts_per_step groups at once, then learns from them in micro-batches
        # of whole groups: the full-vocabulary logits of a big batch are what costs memory here.
        per_device_train_batch_size=micro * settings.num_generations,
        gradient_accumulation_steps=settings.prompts_per_step // micro,
        optim=settings.optim,
        num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length,
        learning_rate=settings.learning_rate,
        temperature=settings.temperature,
        beta=settings.beta,
        reward_weights=weights,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=settings.use_cpu,
        bf16=False,
        seed=settings.seed,
        disable_tqdm=True,
    )
    report = _callback_class()(settings, out_dir)
    trainer = GRPOTrainer(
        model=resolve_model(settings.policy),
        reward_funcs=funcs,
        args=config,
        train_dataset=Dataset.from_list(load_prompts(settings)),
        callbacks=[report],
    )
    start = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - start
    rows = report.rows
    if rows:
        plot_rewards(rows, out_dir / "reward_curve.png", f"GRPO {settings.job_id}: rewards from the judge")
    summary = {
        "job_id": settings.job_id,
        "steps": len(rows),
        "seconds": round(seconds, 1),
        "steps_per_minute": round(60 * len(rows) / seconds, 2) if seconds else None,
        "mean_judge_latency_s": _mean(r.get("judge/latency_s") for r in rows),
        "final_reward": rows[-1]["reward"] if rows else None,
        "transport": settings.transport,
        "completions": log.completions if log else None,
        "duplicate_completions": log.duplicates if log else None,
        "duplicate_rate": round(log.duplicate_rate, 4) if log and log.duplicate_rate is not None else None,
    }
    if settings.judge_report:
        final = read_report(settings) or report.report
        if final is not None:
            (out_dir / "judge_report.json").write_text(final.model_dump_json(indent=2))
            summary["judge_warnings"] = final.warnings
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return out_dir


def _mean(values) -> float | None:
    vals = [v for v in values if isinstance(v, int | float)]
    return round(sum(vals) / len(vals), 3) if vals else None
