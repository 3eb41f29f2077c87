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
) -> None:
    """Start the reward server (needs the server extra: pip install 'referee[cpu]' or 'referee[gpu]')."""
    try:
        from reward_server.cli import serve as run_server
    except ImportError as exc:
        console.print(f"[red]the server is not installed ({exc}); install referee[cpu] or referee[gpu][/red]")
        raise typer.Exit(1) from exc
    run_server(config, host, port)


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


if __name__ == "__main__":
    app()
