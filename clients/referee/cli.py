"""The ``referee`` command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .client import Referee, RefereeError
from .defaults import DEFAULT_PREFIX, DEFAULT_URL
from .protocol import PairwiseItem, ScoreItem

app = typer.Typer(help="referee: reward models and LLM judges for RL post-training.", no_args_is_help=True)
console = Console()

UrlOption = Annotated[str, typer.Option("--url", envvar="REFEREE_URL", help="The server's base URL.")]
KeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="REFEREE_API_KEY",
        show_default=False,
        help="API key for a server with tenants (prefer $REFEREE_API_KEY: a flag shows in `ps`).",
    ),
]


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option(help="YAML file of judges and limits.", exists=True)] = None,
    host: Annotated[str | None, typer.Option(help="Interface to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    queue: Annotated[
        bool | None,
        typer.Option("--queue/--no-queue", help="Also judge requests from the Redis queue (REDIS_URL)."),
    ] = None,
    allow_open: Annotated[
        bool | None,
        typer.Option(
            "--allow-open",
            help="Without tenants, bind a non-loopback --host anyway: anyone who reaches it can use it "
            "(REFEREE_ALLOW_OPEN=1).",
        ),
    ] = None,
) -> None:
    """Start the reward server (installed with the cpu or gpu extra)."""
    try:
        from reward_server.cli import serve as run_server
    except ImportError as exc:
        console.print(f"[red]the server is not installed ({exc}); install referee[cpu] or referee[gpu][/red]")
        raise typer.Exit(1) from exc
    run_server(config, host, port, queue, allow_open=allow_open)


config_app = typer.Typer(help="Judges files: check one before serving it.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("check")
def config_check(
    config: Annotated[
        Path, typer.Argument(help="YAML file of judges and limits.", exists=True, dir_okay=False)
    ],
    gpus: Annotated[
        str | None,
        typer.Option(
            help="The GPUs to plan for, e.g. 1x80GiB, 2x24GB or 80GiB,40GiB (default: this machine's)."
        ),
    ] = None,
) -> None:
    """Check a judges file: its settings, where each engine would run and whether it fits in GPU
    memory, from the models' own files (loads nothing; exit 1 if it cannot start)."""
    try:
        from pydantic import ValidationError

        from reward_server.cli import settings_problems
        from reward_server.memory_plan import PlanError, parse_gpus, plan, visible_gpus
        from reward_server.settings import load_settings
    except ImportError as exc:
        console.print(f"[red]the server is not installed ({exc}); install referee[cpu] or referee[gpu][/red]")
        raise typer.Exit(1) from exc
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # pydantic-settings on the yaml_file key
            settings = load_settings(config)
    except ValidationError as exc:
        typer.echo(f"{config}: invalid settings\n{settings_problems(exc)}", err=True)
        raise typer.Exit(1) from exc
    try:
        sizes = parse_gpus(gpus) if gpus else visible_gpus()
        if not sizes:
            typer.echo(
                "no GPU visible here: say which to plan for with --gpus, e.g. --gpus 1x80GiB", err=True
            )
            raise typer.Exit(1)
        result = plan(settings, sizes)
    except PlanError as exc:
        typer.echo(f"{config}: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(result.render())
    if not result.ok:
        typer.echo(f"{config}: the judges do not fit their GPUs", err=True)
        raise typer.Exit(1)
    typer.echo(f"{config}: fits" + (" (some judges not checked)" if result.unchecked else ""))


@app.command()
def judges(url: UrlOption = DEFAULT_URL, api_key: KeyOption = None) -> None:
    """List the judges the server has loaded."""
    with Referee(url, api_key=api_key) as ref:
        info = _ask(ref.judges)
        shown = ref.url
    table = Table("name", "kind", "model", "routes", "pairwise modes", title=f"judges at {shown}")
    for j in info.judges:
        table.add_row(
            j.name + (" (default)" if j.default else ""),
            j.kind,
            j.model,
            ", ".join(j.routes),
            ", ".join(j.pairwise_modes),
        )
    console.print(table)


def _rows(file: Path | None) -> list[dict]:
    if file is None:
        return []
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def _num(value: float | None, spec: str = "{:.3f}") -> str:
    return "-" if value is None else spec.format(value)


FileOption = Annotated[
    Path | None, typer.Option("--file", help="JSONL input instead of arguments.", exists=True)
]
JudgeOption = Annotated[str | None, typer.Option(help="Judge name (default: the server's default).")]


@app.command()
def score(
    prompt: Annotated[str | None, typer.Option(help="The question.")] = None,
    response: Annotated[list[str] | None, typer.Option(help="A response to score (repeatable).")] = None,
    file: FileOption = None,
    judge: JudgeOption = None,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
) -> None:
    """Score responses (arguments, or a JSONL file of {prompt, response})."""
    items = [ScoreItem(prompt=r["prompt"], response=r["response"]) for r in _rows(file)]
    items += [ScoreItem(prompt=prompt or "", response=r) for r in response or []]
    if not items:
        raise typer.BadParameter("give --prompt and --response, or --file")
    with Referee(url, api_key=api_key) as ref:
        out = _ask(lambda: ref.score(judge=judge, items=items))
    table = Table("#", "response", "score", "error", title=f"POST /score ({out.judge})")
    for it, r in zip(items, out.results, strict=True):
        table.add_row(str(r.index), it.response[:60], _num(r.score, "{:.4f}"), r.error or "")
    console.print(table)


@app.command()
def pairwise(
    prompt: Annotated[str | None, typer.Option(help="The question.")] = None,
    a: Annotated[str | None, typer.Option("--a", help="Response A.")] = None,
    b: Annotated[str | None, typer.Option("--b", help="Response B.")] = None,
    file: FileOption = None,
    judge: JudgeOption = None,
    mode: Annotated[str, typer.Option(help="logprob or cot.")] = "logprob",
    order: Annotated[str, typer.Option(help="single, random or both.")] = "both",
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
) -> None:
    """Compare two responses (arguments, or a JSONL file of {prompt, response_a, response_b})."""
    items = [
        PairwiseItem(prompt=r["prompt"], response_a=r["response_a"], response_b=r["response_b"])
        for r in _rows(file)
    ]
    if a is not None and b is not None:
        items.append(PairwiseItem(prompt=prompt or "", response_a=a, response_b=b))
    if not items:
        raise typer.BadParameter("give --prompt, --a and --b, or --file")
    with Referee(url, api_key=api_key) as ref:
        out = _ask(lambda: ref.pairwise(judge=judge, items=items, mode=mode, order=order))
    table = Table(
        "#",
        "A",
        "B",
        "P(A better)",
        "verdict",
        "orders agree",
        "error",
        title=f"POST /pairwise ({out.judge}, mode={mode}, order={order})",
    )
    for it, r in zip(items, out.results, strict=True):
        table.add_row(
            str(r.index),
            it.response_a[:40],
            it.response_b[:40],
            _num(r.p_a),
            r.verdict,
            "-" if r.consistent is None else str(r.consistent),
            r.error or "",
        )
    console.print(table)


@app.command()
def winrate(
    prompt: Annotated[str | None, typer.Option(help="The question.")] = None,
    response: Annotated[list[str] | None, typer.Option(help="A response of the group (repeatable).")] = None,
    file: Annotated[
        Path | None, typer.Option("--file", help="JSON file of {prompt, responses}.", exists=True)
    ] = None,
    judge: JudgeOption = None,
    mode: Annotated[str, typer.Option(help="logprob or cot.")] = "logprob",
    order: Annotated[str, typer.Option(help="single, random or both.")] = "both",
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
) -> None:
    """Pref-GRPO win rates of a group of responses to one prompt."""
    if file is not None:
        data = json.loads(file.read_text())
        prompt, response = data["prompt"], data["responses"]
    if prompt is None or not response or len(response) < 2:
        raise typer.BadParameter("give --prompt and at least two --response, or --file")
    with Referee(url, api_key=api_key) as ref:
        out = _ask(
            lambda: ref.winrate(judge=judge, prompt=prompt, responses=response, mode=mode, order=order)
        )
    table = Table(
        "#",
        "response",
        "win rate",
        "advantage",
        title=(
            f"POST /winrate ({out.judge}): {out.comparisons} comparisons, "
            f"ties {out.ties}, invalid {out.invalid}"
        ),
    )
    for k, (text, rate, adv) in enumerate(zip(response, out.win_rates, out.advantages, strict=True)):
        table.add_row(str(k), text[:60], _num(rate), _num(adv, "{:+.2f}"))
    console.print(table)
    for error in out.errors:
        console.print(f"[yellow]{error}[/yellow]")


@app.command()
def report(
    job: Annotated[str | None, typer.Option(help="The job (its X-Referee-Job / job_id).")] = None,
    all_jobs: Annotated[bool, typer.Option("--all-jobs", help="Every recent job of the tenant.")] = False,
    judge: Annotated[str | None, typer.Option(help="Only this judge (default: every judge).")] = None,
    tenant: Annotated[
        str | None, typer.Option(help="Another tenant's report (operators only; over HTTP).")
    ] = None,
    redis: Annotated[
        str | None,
        typer.Option(help="Read from this Redis (the queue) instead of the server: queue-only trainers."),
    ] = None,
    prefix: Annotated[str, typer.Option(help="The queue's Redis prefix (with --redis).")] = DEFAULT_PREFIX,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
) -> None:
    """Judge health of a job: ties, order flips, flat groups, length bias, drift, with warnings."""
    if job is None and not all_jobs:
        raise typer.BadParameter("give --job JOB, or --all-jobs")
    if redis is not None:
        import asyncio

        from .queue import QueueReferee

        async def read():
            async with QueueReferee(redis, job_id=job or "default", prefix=prefix, api_key=api_key) as q:
                return await q.report(judge=judge, all_jobs=all_jobs)

        out = _ask(lambda: asyncio.run(read()))
    else:
        with Referee(url, api_key=api_key) as ref:
            out = _ask(lambda: ref.report(job, judge=judge, all_jobs=all_jobs, tenant=tenant))
    if as_json:
        print(out.model_dump_json(indent=2))
        return
    from .health import format_report

    console.print(format_report(out), markup=False, highlight=False, soft_wrap=True)


def _ask(call):
    try:
        return call()
    except RefereeError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc


@app.command("eval")
def eval_pairs(
    file: Annotated[
        Path, typer.Argument(help="JSONL of preference pairs: prompt, chosen, rejected.", exists=True)
    ],
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    judge: Annotated[str | None, typer.Option(help="Judge name (default: the server's default).")] = None,
    mode: Annotated[str, typer.Option(help="logprob or cot.")] = "logprob",
    order: Annotated[str, typer.Option(help="single, random or both.")] = "both",
    limit: Annotated[int | None, typer.Option(help="Only the first N pairs.")] = None,
    batch_size: Annotated[int, typer.Option(help="Pairs per request.")] = 16,
    concurrency: Annotated[int, typer.Option(help="Requests in flight.")] = 4,
    max_new_tokens: Annotated[int | None, typer.Option(help="Reasoning budget for mode=cot.")] = None,
    seed: int = 0,
    output: Annotated[Path | None, typer.Option(help="Write the report as JSON here.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for one request (a batch).")] = 1800.0,
) -> None:
    """Evaluate a judge on human preference pairs: accuracy, position consistency, ties, invalid."""
    import asyncio

    from rich.progress import Progress

    from .client import AsyncReferee
    from .evaluation import evaluate, load_pairs

    pairs = load_pairs(file, limit)

    async def run():
        import httpx

        wait = httpx.Timeout(connect=5.0, read=timeout, write=30.0, pool=timeout)
        async with AsyncReferee(url, timeout=wait, api_key=api_key) as client:
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

    report = _ask(lambda: asyncio.run(run()))
    table = Table("metric", "value", title=f"{report.judge}: {file.name} (mode={mode}, order={order})")
    rows = [
        ("pairs", report.pairs),
        ("accuracy (ties 1/2, invalid excluded)", _num(report.accuracy)),
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


# ---------------------------------------------------------------- keys and Redis ACLs

keys_app = typer.Typer(help="API keys for tenants (teams sharing a judge).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("new")
def keys_new(
    tenant: Annotated[str, typer.Argument(help="The tenant (team) the key is for, e.g. team-a.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print {tenant, key, hash} as JSON.")] = False,
) -> None:
    """Make a new API key: prints the key (once: only its hash is kept), its hash and a tenants entry."""
    from .auth import hash_key, new_key

    try:
        key = new_key(tenant)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="TENANT") from exc
    digest = hash_key(key)
    if as_json:
        typer.echo(json.dumps({"tenant": tenant, "key": key, "hash": digest}))
        return
    typer.echo(f"key:  {key}")
    typer.echo(f"hash: {digest}")
    typer.echo(
        "\n# Give the key to the team (REFEREE_API_KEY); it is shown only now. The server keeps the hash:"
    )
    typer.echo("# add this to the tenants file (REFEREE_TENANTS_FILE), or the hash to the tenant's keys.")
    typer.echo(f'tenants:\n  - name: {tenant}\n    keys:\n      - "{digest}"\n    weight: 1.0')


@keys_app.command("hash")
def keys_hash(
    key: Annotated[
        str | None,
        typer.Argument(
            help="The key; '-' or nothing reads it from standard input (kept out of history).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Print the hash (sha256:<hex>) of an existing key, for the tenants file."""
    import sys

    from .auth import hash_key

    if key in (None, "-"):
        key = sys.stdin.readline().strip()
    if not key:
        raise typer.BadParameter("no key given", param_hint="KEY")
    typer.echo(hash_key(key))


def _read_tenants(path: Path) -> list[dict]:
    """The tenants file, validated by the server's own model when it is installed, else here."""
    try:
        from reward_server.settings import read_tenants_file
    except ImportError:
        read_tenants_file = None
    if read_tenants_file is not None:
        return [t.model_dump() for t in read_tenants_file(path)]
    from .auth import TENANT_PATTERN, valid_hash, valid_tenant

    text = path.read_text()
    try:
        import yaml

        data = yaml.safe_load(text)
    except ImportError:  # the bare client package: JSON (which is YAML too)
        data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("tenants"), list):
        raise ValueError(f"tenants file {path} must hold a mapping with a list under 'tenants'")
    tenants = []
    for k, t in enumerate(data["tenants"]):
        if not isinstance(t, dict) or not valid_tenant(str(t.get("name", ""))):
            raise ValueError(
                f"tenants[{k}]: a name matching {TENANT_PATTERN} (not a reserved one) is required"
            )
        keys = t.get("keys")
        if (
            not isinstance(keys, list)
            or not keys
            or not all(isinstance(h, str) and valid_hash(h) for h in keys)
        ):
            raise ValueError(
                f"tenants[{k}] ({t['name']}): keys must be a list of 'sha256:<64 hex digits>' hashes "
                "(`referee keys hash KEY`), never the keys themselves"
            )
        tenants.append(t)
    names = [t["name"] for t in tenants]
    if len(set(names)) != len(names):
        raise ValueError(f"tenant names must be unique, got {names}")
    return tenants


@app.command("redis-acl")
def redis_acl(
    tenants: Annotated[
        Path,
        typer.Option("--tenants", help="Tenants file (YAML `tenants: [...]`, keys hashed).", exists=True),
    ],
    prefix: Annotated[
        str, typer.Option(help="The queue's Redis key prefix (queue.prefix).")
    ] = DEFAULT_PREFIX,
    server_password_env: Annotated[
        str,
        typer.Option(
            help="Environment variable holding the password of the server's own Redis user "
            "(referee-server); unset: no server user."
        ),
    ] = "REFEREE_REDIS_PASSWORD",
    apply: Annotated[
        str | None,
        typer.Option(
            "--apply",
            metavar="REDIS_URL",
            show_default=False,
            help="Apply the users to this Redis (ACL SETUSER) instead of printing the file; a "
            "redis+cluster:// URL applies them on every node of the cluster.",
        ),
    ] = None,
    keep_default_user: Annotated[
        bool,
        typer.Option(
            "--keep-default-user",
            help="Leave Redis' passwordless `default` user as it is (by default it is switched off).",
        ),
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option(
            help="Write the ACL file here (mode 0600) instead of standard output.", show_default=False
        ),
    ] = None,
) -> None:
    """The Redis ACL file for the queue: one user per tenant (password: its API key), and the server's.

    Redis loads it with `--aclfile FILE`; --apply sets the users on a running Redis instead.
    """
    import os

    try:
        from .acl import acl_rules, apply_acl
    except ImportError as exc:  # pragma: no cover - the ACL module ships with the SDK
        console.print(f"[red]referee.acl is missing: {exc}[/red]")
        raise typer.Exit(1) from exc
    try:
        found = _read_tenants(tenants)
    except (OSError, ValueError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    password = os.environ.get(server_password_env) or None
    if password is None:
        typer.echo(
            f"note: ${server_password_env} is not set: no Redis user for the server is written", err=True
        )
    rules = acl_rules(found, prefix=prefix, server_password=password, disable_default=not keep_default_user)
    if apply is not None:
        import redis

        from .client import redact
        from .connection import connect

        client = connect(apply, sync=True)  # a cluster URL: the users go to every node
        default = [r for r in rules if r.split()[:2] == ["user", "default"]]
        try:
            users = apply_acl(client, [r for r in rules if r not in default])
            # Last: connections already logged in as `default` (this one) keep working.
            users += apply_acl(client, default, include_default=True)
        except redis.RedisError as exc:
            console.print(f"[red]cannot apply the ACL: {redact(str(exc), password)}[/red]")
            raise typer.Exit(1) from exc
        finally:
            client.close()
        typer.echo(f"applied users: {', '.join(users)}")
        if default:
            typer.echo(
                "Redis' `default` user is now off: log in as another user from now on "
                "(--keep-default-user leaves it on)",
                err=True,
            )
        return
    text = "\n".join(rules) + "\n"
    if output is None:
        typer.echo(text, nl=False)
        return
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    typer.echo(f"wrote {len(rules)} ACL rules to {output}", err=True)


if __name__ == "__main__":
    app()
