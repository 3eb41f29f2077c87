"""API keys and tenants: what the server, the clients and the Redis ACL generator agree on.

A key looks like ``rk.<tenant>.<secret>`` (``referee keys new TENANT`` makes one): the tenant name
in the clear lets a queue client log in to Redis as its tenant's ACL user without being told the
name, and lets an operator see whose key leaked. Only the key's SHA-256 (``sha256:<hex>``) is ever
stored, in the tenants file; the keys carry 256 random bits, so a fast hash is the right one (as for
GitHub's tokens), and it is the very form Redis ACL files take for passwords (``#<hex>``), so one key
opens both the HTTP API and the tenant's own keys in Redis. Any other string can be a key too
(``referee keys hash``); its tenant must then be given to queue clients.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets

KEY_PREFIX = "rk"
HASH_PREFIX = "sha256:"
ENV_KEY = "REFEREE_API_KEY"
# No '.', ':' or glob characters: a tenant name is part of keys, Redis key names and ACL patterns.
TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
RESERVED_TENANTS = frozenset({"default", "referee-server"})  # Redis' own user and the server's
OPEN_TENANT = "anonymous"  # every request's tenant when the server runs without keys
_TENANT = re.compile(TENANT_PATTERN)
_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")


def valid_tenant(name: str) -> bool:
    return bool(_TENANT.match(name)) and name not in RESERVED_TENANTS


def new_key(tenant: str) -> str:
    """A fresh key for ``tenant``: ``rk.<tenant>.<43 characters of URL-safe base64>``."""
    if not valid_tenant(tenant):
        raise ValueError(
            f"tenant name {tenant!r} must match {TENANT_PATTERN} and not be one of {sorted(RESERVED_TENANTS)}"
        )
    return f"{KEY_PREFIX}.{tenant}.{secrets.token_urlsafe(32)}"


def hash_key(key: str) -> str:
    """What the tenants file stores for ``key``: ``sha256:<64 hex digits>``."""
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def valid_hash(value: str) -> bool:
    return bool(_HASH.match(value))


def tenant_of(key: str) -> str | None:
    """The tenant named in a ``rk.<tenant>.<secret>`` key, else None."""
    parts = key.split(".")
    if len(parts) == 3 and parts[0] == KEY_PREFIX and valid_tenant(parts[1]) and parts[2]:
        return parts[1]
    return None


def same_hash(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def key_from_env(api_key: str | None = None) -> str | None:
    """An explicit key, else ``$REFEREE_API_KEY``, else None (an open server)."""
    return api_key or os.environ.get(ENV_KEY) or None
