"""Loud failure: a server whose engine died, or whose judges failed to load, stops serving and exits.

An engine core process that dies (killed, out of memory, a crashed kernel) cannot be brought back
inside the API process: every later request would fail. So the supervisor marks the service fatal
(``/healthz`` and ``/readyz`` answer 503, judging routes 503), then stops the server with SIGTERM,
and the command exits with ``EXIT_FATAL`` so that compose or Kubernetes starts a fresh replica.
"""

from __future__ import annotations

import asyncio
import logging
import signal

logger = logging.getLogger(__name__)

EXIT_FATAL = 3


class Supervisor:
    def __init__(self, service, interval_s: float = 0.5, request_exit=None) -> None:
        self.service = service
        self.request_exit = request_exit  # stops the HTTP server (``serve`` passes uvicorn's)
        self.interval_s = interval_s
        self.exit_code = 0

    def check(self) -> str | None:
        """Why the server cannot serve any more, or None."""
        if self.service.load_error:
            return f"the judges failed to load: {self.service.load_error}"
        dead = sorted(
            name
            for name, judge in self.service.judges.items()
            if judge.engine is not None and judge.engine.dead
        )
        if dead:
            return f"the vLLM engine of judge {', '.join(map(repr, dead))} died"
        return None

    async def run(self) -> None:
        while True:
            reason = self.check()
            if reason is not None:
                self.fail(reason)
                return
            await asyncio.sleep(self.interval_s)

    def fail(self, reason: str) -> None:
        """Mark the service fatal and stop the process (once)."""
        if self.exit_code:
            return
        self.service.fatal = reason
        self.exit_code = EXIT_FATAL
        logger.critical("%s: stopping the server (exit code %d) so that it is restarted", reason, EXIT_FATAL)
        if self.request_exit is not None:
            self.request_exit()  # uvicorn shuts down gracefully, then serve() exits non-zero
        else:  # not under serve(): stop the process the way an orchestrator would
            signal.raise_signal(signal.SIGTERM)
