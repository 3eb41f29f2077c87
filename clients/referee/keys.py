"""Every Redis key and stream name referee uses, in one place.

One request stream per training job keeps jobs apart, so consumers can serve them in turn; replies
go to a per-request list the sender blocks on, with a result key that makes answers idempotent.
Everything but the request streams and the dead-letter stream expires.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "referee"
CONSUMER_GROUP = "judges"


@dataclass(frozen=True)
class Keys:
    prefix: str = DEFAULT_PREFIX

    @property
    def jobs(self) -> str:
        """Sorted set of job ids with a request stream, scored by last send time."""
        return f"{self.prefix}:jobs"

    def stream(self, job_id: str) -> str:
        """A job's request stream (consumer group ``CONSUMER_GROUP``)."""
        return f"{self.prefix}:requests:{job_id}"

    def reply(self, request_id: str) -> str:
        """List the sender pops its answer from (expires)."""
        return f"{self.prefix}:reply:{request_id}"

    def result(self, request_id: str) -> str:
        """Marker that a request was answered: makes a second answer impossible (expires)."""
        return f"{self.prefix}:result:{request_id}"

    @property
    def dead_letter(self) -> str:
        """Stream of messages that could not be judged, with their error."""
        return f"{self.prefix}:dead-letter"

    @property
    def limits(self) -> str:
        """Hash of limits the consumers publish for senders (``max_backlog``); no expiry."""
        return f"{self.prefix}:limits"

    @property
    def judges(self) -> str:
        """The judges the consumers serve (JSON of ``JudgesResponse``, refreshed, expires)."""
        return f"{self.prefix}:judges"

    def job_from_stream(self, stream: str) -> str:
        return stream.removeprefix(f"{self.prefix}:requests:")
