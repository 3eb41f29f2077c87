"""``referee-trainer``: run one GRPO training job against the shared judge."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False)


@app.command()
def main(
    job_id: Annotated[
        str | None, typer.Option(help="The job's id: its queue stream and output folder.")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file of training settings.", exists=True)] = None,
    max_steps: Annotated[int | None, typer.Option(help="GRPO steps.")] = None,
    transport: Annotated[str | None, typer.Option(help="queue (Redis) or http.")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="Where runs/<job-id>/ goes.")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling and initialisation seed.")] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="REFEREE_API_KEY",
            show_default=False,
            help="The tenant's API key (prefer $REFEREE_API_KEY: a flag shows in `ps`).",
        ),
    ] = None,
) -> None:
    """Train a policy with GRPO, with rewards from the referee judge (win rates by default)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .settings import load_train_settings
    from .worker import run

    overrides = {
        k: v
        for k, v in dict(
            job_id=job_id,
            max_steps=max_steps,
            transport=transport,
            output_dir=output_dir,
            seed=seed,
            api_key=api_key,
        ).items()
        if v is not None
    }
    settings = load_train_settings(config, **overrides)
    out = run(settings)
    typer.echo(
        f"[{settings.job_id}] done: metrics {out / 'metrics.jsonl'}, plot {out / 'reward_curve.png'}, "
        f"summary {out / 'summary.json'}"
    )


if __name__ == "__main__":
    app()
