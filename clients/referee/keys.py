"""Every Redis key and stream name referee uses, in one place.

Each tenant has a namespace of its own, ``{prefix}:{t:<tenant>}:``, holding its jobs, their request
streams, its replies and result markers, its dead letters and its copy of the limits; a tenant's
Redis ACL user may touch that namespace and nothing else (``referee.acl``), and read the two shared
keys the consumers publish (``{prefix}:limits``, ``{prefix}:judges``). A server without tenants
serves the open tenant, ``anonymous``.

Key layout 2 (``KEY_LAYOUT``): the ``{t:<tenant>}`` part is a Redis Cluster hash tag, so every key of
a tenant lives in one hash slot and every script (which touches one tenant's keys) stays single-slot
on a cluster. The prefix is never in braces (it cannot be: ``PREFIX_PATTERN``), or every tenant
would share one slot. The shared keys are in slots of their own: scripts never touch them, they read
the tenant's copy of the limits (``tenant_limits``), which the consumers publish beside the shared
hash. Layout 1 (before) was ``{prefix}:t:<tenant>:``; the consumers publish their layout in the
limits (``key_layout``) and ``QueueReferee`` refuses a server on another one (docs/queue.md,
"Upgrading the key layout").

One request stream per training job keeps jobs apart, so consumers can serve them in turn; replies
go to a per-request list the sender blocks on, with a result key that makes answers idempotent.
Everything but the request streams and the dead-letter stream expires.

Job and request ids are parts of key names: they are checked (``ID_PATTERN``: no ``:``, no glob
characters, no spaces) so that none can reach outside its tenant's namespace or its job's keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .auth import OPEN_TENANT, valid_tenant
from .defaults import DEFAULT_PREFIX

CONSUMER_GROUP = "judges"
# The layout of the key names below: published in the limits hash (``key_layout``), checked by senders.
KEY_LAYOUT = 2
# Job and request ids: no ':' (a key separator) and no glob characters ('*?[]\', ACL patterns).
ID_PATTERN = r"^[A-Za-z0-9_.-]{1,128}$"
# A prefix is the start of every key name and of the ACL patterns: no glob characters or spaces.
PREFIX_PATTERN = r"^[A-Za-z0-9_.:-]{1,100}$"
_ID = re.compile(ID_PATTERN)
_PREFIX = re.compile(PREFIX_PATTERN)


def valid_id(value: str) -> bool:
    return isinstance(value, str) and bool(_ID.match(value))


def check_id(value: str, what: str = "id") -> str:
    if not valid_id(value):
        raise ValueError(
            f"{what} {value!r} must match {ID_PATTERN} (letters, digits, '_', '.', '-'; at most 128)"
        )
    return value


def check_prefix(prefix: str) -> str:
    if not _PREFIX.match(prefix or ""):
        raise ValueError(f"Redis prefix {prefix!r} must match {PREFIX_PATTERN} (no glob characters)")
    return prefix


@dataclass(frozen=True)
class Keys:
    """The keys of one tenant (``tenant``) under ``prefix``."""

    prefix: str = DEFAULT_PREFIX
    tenant: str = OPEN_TENANT

    def __post_init__(self) -> None:
        check_prefix(self.prefix)
        if not valid_tenant(self.tenant):
            raise ValueError(f"{self.tenant!r} is not a valid tenant name")

    # ------------------------------------------------------------ the tenant's namespace

    @property
    def namespace(self) -> str:
        """Every key of this tenant starts with this (``{prefix}:{t:<tenant>}:``): the braces make
        ``t:<tenant>`` the hash tag, so all of a tenant's keys share one Redis Cluster slot."""
        return f"{self.prefix}:{self.hash_tag}:"

    @property
    def hash_tag(self) -> str:
        """The part of every key of this tenant that Redis Cluster hashes: ``{t:<tenant>}``."""
        return "{t:" + self.tenant + "}"

    @property
    def pattern(self) -> str:
        """The glob pattern of this tenant's keys (its ACL user's ``~pattern``)."""
        return f"{self.namespace}*"

    @property
    def jobs(self) -> str:
        """Sorted set of job ids with a request stream, scored by last send time."""
        return f"{self.namespace}jobs"

    @property
    def streams_prefix(self) -> str:
        """What this tenant's request stream names start with (the job id follows)."""
        return f"{self.namespace}requests:"

    def stream(self, job_id: str) -> str:
        """A job's request stream (consumer group ``CONSUMER_GROUP``)."""
        return self.streams_prefix + check_id(job_id, "job id")

    def reply(self, job_id: str, request_id: str) -> str:
        """List the sender pops its answer from (expires)."""
        return f"{self.namespace}reply:{check_id(job_id, 'job id')}:{check_id(request_id, 'request id')}"

    def result(self, job_id: str, request_id: str) -> str:
        """Marker that a request was answered: makes a second answer impossible (expires)."""
        return f"{self.namespace}result:{check_id(job_id, 'job id')}:{check_id(request_id, 'request id')}"

    @property
    def dead_letter(self) -> str:
        """Stream of this tenant's messages that could not be judged, with their error."""
        return f"{self.namespace}dead-letter"

    @property
    def blobs_prefix(self) -> str:
        """What this tenant's uploaded images' key names start with (the digest follows)."""
        return f"{self.namespace}blob:"

    def blob(self, digest: str) -> str:
        """An uploaded image's bytes, by the hex SHA-256 of its file (expires)."""
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{digest!r} is not a hex SHA-256 digest")
        return self.blobs_prefix + digest

    @property
    def blob_bytes(self) -> str:
        """Bytes this tenant uploaded within the blob TTL (a counter that expires with the newest)."""
        return f"{self.namespace}blob-bytes"

    def health(self, job_id: str) -> str:
        """Hash of a job's judge-health tallies per window (``referee.health``): written by the
        servers only (a tenant may read it, not write it), expires."""
        return f"{self.namespace}health:{check_id(job_id, 'job id')}"

    @property
    def health_jobs(self) -> str:
        """Sorted set of the jobs with a health hash, scored by the last answer (servers write it)."""
        return f"{self.namespace}health-jobs"

    @property
    def tenant_limits(self) -> str:
        """This tenant's copy of the limits hash (the fields of ``limits`` that concern it; the
        consumers publish it for every tenant they serve): what the senders' scripts read, since a
        script on Redis Cluster may only touch keys of one slot, its tenant's. Read-only to tenants."""
        return f"{self.namespace}limits"

    def job_from_stream(self, stream: str) -> str:
        return stream.removeprefix(self.streams_prefix)

    def for_tenant(self, tenant: str) -> Keys:
        return Keys(self.prefix, tenant)

    # ------------------------------------------------------------ shared (read-only for tenants)

    @property
    def limits(self) -> str:
        """Hash of limits the consumers publish for senders (``max_backlog``, ``max_queued:<tenant>``,
        ``auth``); no expiry."""
        return f"{self.prefix}:limits"

    @property
    def judges(self) -> str:
        """The judges the consumers serve (JSON of ``JudgesResponse``, refreshed, expires)."""
        return f"{self.prefix}:judges"

    @property
    def tenants_pattern(self) -> str:
        """The glob pattern of every tenant's keys under this prefix (the consumers' sweep)."""
        return f"{self.prefix}:{{t:*"

    def tenant_of_key(self, key: str) -> str | None:
        """The tenant whose namespace ``key`` is in, or None."""
        start = f"{self.prefix}:{{t:"
        if not key.startswith(start):
            return None
        tenant, sep, _ = key[len(start) :].partition("}:")
        return tenant if sep and valid_tenant(tenant) else None

    @property
    def shared_keys(self) -> tuple[str, str]:
        """The keys every tenant may read and none may write."""
        return (self.limits, self.judges)
