"""``referee-server``: start the reward server (also reachable as ``referee serve``)."""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import ValidationError


def settings_problems(exc: ValidationError) -> str:
    """One line per problem, where it is and what is wrong (pydantic's own text adds the input and
    a documentation link to each)."""
    lines = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(part) for part in err["loc"]) or "settings"
        lines.append(f"  {where}: {err['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def serve(
    config: Path | None = None,
    host: str | None = None,
    port: int | None = None,
    queue: bool | None = None,
    *,
    allow_open: bool | None = None,
) -> None:
    import uvicorn

    from .app import create_app
    from .settings import load_settings
    from .tenancy import UnsafeExposure

    overrides = {
        k: v for k, v in (("host", host), ("port", port), ("allow_open", allow_open)) if v is not None
    }
    try:
        settings = load_settings(config, **overrides)
    except ValidationError as exc:
        where = f" in {config}" if config is not None else ""
        raise SystemExit(f"referee: the settings{where} are not valid:\n{settings_problems(exc)}") from None
    if queue is not None:
        settings.queue.enabled = queue
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        app = create_app(settings)
    except UnsafeExposure as exc:
        logging.getLogger("reward_server").error("%s", exc)
        raise SystemExit(f"referee: {exc}") from None
    server = uvicorn.Server(
        uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level)
    )
    # A fatal fault (dead engine, failed load) stops the server this way rather than by a signal,
    # which uvicorn would re-raise on exit, ending the process before it can exit non-zero.
    app.state.request_exit = lambda: setattr(server, "should_exit", True)
    server.run()
    supervisor = getattr(app.state, "supervisor", None)
    if supervisor is not None and supervisor.exit_code:
        raise SystemExit(supervisor.exit_code)  # a dead engine or failed load: let the orchestrator restart


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Start the referee reward server.")
    parser.add_argument("--config", type=Path, default=None, help="YAML file of judges and limits")
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument(
        "--queue",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also judge requests from the Redis queue (REDIS_URL)",
    )
    parser.add_argument(
        "--allow-open",
        action="store_true",
        default=None,
        help="without tenants, bind a non-loopback --host anyway: anyone who reaches it can use it "
        "(REFEREE_ALLOW_OPEN=1)",
    )
    args = parser.parse_args()
    serve(args.config, args.host, args.port, args.queue, allow_open=args.allow_open)


if __name__ == "__main__":
    main()
