"""The ``referee`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .client import DEFAULT_URL, Referee

app = typer.Typer(help="referee: reward models and LLM judges for RL post-training.", no_args_is_help=True)
console = Console()

UrlOption = Annotated[str, typer.Option("--url", envvar="REFEREE_URL", help="The server's base URL.")]


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option(help="YAML file of judges and limits.", exists=True)] = None,
    host: Annotated[str | None, typer.Option(help="Interface to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    queue: Annotated[
        bool | None,
        typer.Option("--queue/--no-queue", help="Also judge requests from the Redis queue (REDIS_URL)."),
    ] = None,
) -> None:
    """Start the reward server (needs the server extra: pip install 'referee[cpu]' or 'referee[gpu]')."""
    try:
        from reward_server.cli import serve as run_server
    except ImportError as exc:
        console.print(f"[red]the server is not installed ({exc}); install referee[cpu] or referee[gpu][/red]")
        raise typer.Exit(1) from exc
    run_server(config, host, port, queue)


@app.command()
def judges(url: UrlOption = DEFAULT_URL) -> None:
    """List the judges the server has loaded."""
    with Referee(url) as ref:
        info = ref.judges()
    table = Table("name", "kind", "model", "routes", "pairwise modes", title=f"judges at {url}")
    for j in info.judges:
        table.add_row(
            j.name + (" (default)" if j.default else ""),
            j.kind,
            j.model,
            ", ".join(j.routes),
            ", ".join(j.pairwise_modes),
        )
    console.print(table)


@app.command("eval")
def eval_pairs(
    file: Annotated[
        Path, typer.Argument(help="JSONL of preference pairs: prompt, chosen, rejected.", exists=True)
    ],
    url: UrlOption = DEFAULT_URL,
    judge: Annotated[str | None, typer.Option(help="Judge name (default: the server's default).")] = None,
    mode: Annotated[str, typer.Option(help="logprob or cot.")] = "logprob",
    order: Annotated[str, typer.Option(help="single, random or both.")] = "both",
    limit: Annotated[int | None, typer.Option(help="Only the first N pairs.")] = None,
    batch_size: Annotated[int, typer.Option(help="Pairs per request.")] = 16,
    concurrency: Annotated[int, typer.Option(help="Requests in flight.")] = 4,
    max_new_tokens: Annotated[int | None, typer.Option(help="Reasoning budget for mode=cot.")] = None,
    seed: int = 0,
    output: Annotated[Path | None, typer.Option(help="Write the report as JSON here.")] = None,
) -> None:
    """Evaluate a judge on human preference pairs: accuracy, position consistency, ties, invalid."""
    import asyncio

    from rich.progress import Progress

    from .client import AsyncReferee
    from .evaluation import evaluate, load_pairs

    pairs = load_pairs(file, limit)

    async def run():
        async with AsyncReferee(url) as client:
            with Progress(console=console) as progress:
                task = progress.add_task(f"judging {len(pairs)} pairs", total=len(pairs))
                return await evaluate(
                    client,
                    pairs,
                    judge=judge,
                    mode=mode,
                    order=order,
                    batch_size=batch_size,
                    concurrency=concurrency,
                    seed=seed,
                    max_new_tokens=max_new_tokens,
                    on_progress=lambda n: progress.advance(task, n),
                )

    report = asyncio.run(run())
    table = Table("metric", "value", title=f"{report.judge}: {file.name} (mode={mode}, order={order})")
    rows = [
        ("pairs", report.pairs),
        ("accuracy (ties 1/2, invalid excluded)", f"{report.accuracy:.3f}"),
        ("strict accuracy", f"{report.strict_accuracy:.3f}"),
        ("correct / wrong", f"{report.correct} / {report.wrong}"),
        ("ties", report.ties),
        ("invalid", report.invalid),
        (
            "position consistency",
            "-" if report.position_consistency is None else f"{report.position_consistency:.3f}",
        ),
        ("mean P(chosen)", "-" if report.mean_p_chosen is None else f"{report.mean_p_chosen:.3f}"),
        ("time", f"{report.seconds:.1f}s ({report.pairs_per_second:.1f} pairs/s)"),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)
    confusion = Table(
        "chosen shown as", "A", "B", "tie", "invalid", title="verdicts by position of the chosen response"
    )
    for row, counts in report.confusion.items():
        confusion.add_row(
            row.removeprefix("chosen shown as "),
            *(str(counts.get(v, 0)) for v in ("A", "B", "tie", "invalid")),
        )
    console.print(confusion)
    if output:
        output.write_text(report.to_json())
        console.print(f"report written to {output}")


if __name__ == "__main__":
    app()
