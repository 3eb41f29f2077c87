"""``referee-server``: start the reward server (also reachable as ``referee serve``)."""

from __future__ import annotations

import logging
from pathlib import Path


def serve(
    config: Path | None = None, host: str | None = None, port: int | None = None, queue: bool | None = None
) -> None:
    import uvicorn

    from .app import create_app
    from .settings import load_settings

    overrides = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    settings = load_settings(config, **overrides)
    if queue is not None:
        settings.queue.enabled = queue
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings)
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
    args = parser.parse_args()
    serve(args.config, args.host, args.port, args.queue)


if __name__ == "__main__":
    main()
