"""Redis ACL users for tenants: each tenant reaches its own keys in Redis and nothing else.

Every tenant gets a Redis user named after it whose password is its API key. Redis ACL files
store a password as ``#<sha256 hex>``, the very hash the tenants file stores (``sha256:<hex>``), so
the rules come from the tenants file without knowing any key. A tenant's user may:

- read and write the keys of its own namespace, ``{prefix}:t:{tenant}:*`` (its jobs, request
  streams, replies, result markers, dead letters);
- read, never write, the two keys the consumers publish: ``{prefix}:limits`` and ``{prefix}:judges``;
- run only the commands ``QueueReferee`` uses (``TENANT_COMMANDS``), and no Pub/Sub channel.

So tenant A can neither read B's prompts (B's streams) nor B's answers, nor push a forged answer
onto B's reply list, nor change the limits. The consumers log in as ``referee-server``
(``SERVER_COMMANDS`` on ``{prefix}:*``). Redis' ``default`` user is switched off unless asked.

Scripts: a tenant may run a Lua script only with ``EVALSHA``, i.e. one already in Redis' script
cache; it has no ``SCRIPT`` (``LOAD``, ``FLUSH``, ``KILL``...), no ``EVAL`` and no ``FUNCTION`` or
``FCALL``. A Lua script runs to its end while every other client waits, so a tenant able to load
one could block Redis for all tenants with ``while true do end``. The consumers load the scripts
senders need (``referee.scripts.TENANT_SCRIPTS``) on every connect. The script cache is shared by
all users, and a script runs with its caller's rights: a tenant may run the consumers' scripts too,
but they can only touch what its own user may. Only trusted code may log in as a user with
``SCRIPT LOAD`` (the server's; and the ``default`` user, off here, which has every right when on).

What ACLs do not bound: a tenant may ``XADD`` to its own request streams directly, not through the
send script, and so skip the per-job cap (``max_backlog``) and its own cap on waiting messages
(``max_queued``); likewise it may ``SET`` keys of its own namespace directly and so skip the upload
limits of the ``BLOB`` script (``media.max_image_bytes``, ``media.tenant_blob_bytes``). That stays
within its own namespace: it cannot touch another tenant's streams,
and the consumers still serve it at its fair share only (fair-share admission by tenant weight),
so others are not starved of the judge. But memory is shared, and what bounds it is Redis itself:
run it with ``maxmemory`` and ``maxmemory-policy noeviction``, so that a flood ends in ``OOM``
refusals (for every sender, retried until their deadlines, until the consumers drain the flood)
rather than in evicted keys or a killed Redis. A tenant's jobs set (which it may write) is bounded
where it matters: the consumers poll its ``max_jobs_per_tenant`` most recent jobs only, and the
send script counts those only, so listing millions of jobs slows nobody but the tenant.

``acl_rules`` makes the lines of an ACL file (``aclfile``), ``apply_acl`` sends them to a running
Redis with ``ACL SETUSER`` (``referee redis-acl``), ``remove_users`` deletes users. Nothing here
imports redis: the functions take a client.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from .auth import HASH_PREFIX, valid_hash, valid_tenant
from .keys import DEFAULT_PREFIX, Keys, check_prefix

SERVER_USER = "referee-server"

# What QueueReferee sends: the send script by EVALSHA only (the consumers load it; no SCRIPT, EVAL or
# FUNCTION: a tenant must not run a script of its own, see above; the script itself runs HGET, XLEN,
# ZRANGE, XADD and ZADD, all checked against the user's rights), BLPOP for the answer, XRANGE and
# EXISTS for its lost-message check, GET and EXISTS for the judges, PING.
# redis-py also sends CLIENT SETINFO on connect: left out on purpose (Redis 7.0 has no such
# subcommand, so an ACL naming it would not load; redis-py ignores its refusal).
TENANT_COMMANDS = (
    "ping",
    "evalsha",
    "hget",
    "xadd",
    "xlen",
    "xrange",
    "zadd",
    "zrange",
    "zrevrange",
    "zscore",
    "zcard",
    "blpop",
    "exists",
    "get",
    # uploads (the BLOB script): the image, the tenant's byte counter, their expiry
    "set",
    "incrby",
    "pexpire",
)

# What the consumers send (reward_server.consumer), scripts' own commands included; SCRIPT LOAD
# and SCRIPT EXISTS keep the senders' scripts in Redis' script cache.
SERVER_COMMANDS = (
    "ping",
    "evalsha",
    "script|load",
    "script|exists",
    "multi",
    "exec",
    "discard",
    "get",
    "set",
    "del",
    "exists",
    "expire",
    "pexpire",
    "incrby",
    "rpush",
    "hset",
    "hdel",
    "hget",
    "zrange",
    "zrangebyscore",
    "zrevrangebyscore",
    "zscore",
    "zrem",
    "xadd",
    "xlen",
    "xrange",
    "xack",
    "xdel",
    "xclaim",
    "xautoclaim",
    "xpending",
    "xreadgroup",
    "xgroup|create",
    "xgroup|delconsumer",
    "xinfo|consumers",
)


def _name_and_hashes(tenant: Any) -> tuple[str, list[str]]:
    if isinstance(tenant, Mapping):
        name, keys = tenant.get("name"), tenant.get("keys")
    else:
        name, keys = getattr(tenant, "name", None), getattr(tenant, "keys", None)
    if not isinstance(name, str) or not valid_tenant(name):
        raise ValueError(f"tenant name {name!r} is not valid (see referee.auth.TENANT_PATTERN)")
    if isinstance(keys, str) or not isinstance(keys, Iterable):
        raise ValueError(f"tenant {name!r}: 'keys' must be a list of 'sha256:<hex>' hashes")
    keys = list(keys)
    if not keys:
        raise ValueError(f"tenant {name!r} has no keys: its Redis user could never log in")
    for key in keys:
        if not isinstance(key, str) or not valid_hash(key):
            raise ValueError(
                f"tenant {name!r}: keys must be stored hashed, 'sha256:<64 hex digits>' "
                "(`referee keys hash KEY`), never the key itself"
            )
    return name, [key.removeprefix(HASH_PREFIX) for key in keys]


def tenant_rule(name: str, hex_hashes: Iterable[str], prefix: str = DEFAULT_PREFIX) -> str:
    """The ACL file line of one tenant."""
    keys = Keys(check_prefix(prefix), name)
    parts = ["user", name, "on", "resetchannels", *(f"#{h}" for h in hex_hashes), f"~{keys.pattern}"]
    parts += [f"%R~{key}" for key in keys.shared_keys]
    parts += ["-@all", *(f"+{c}" for c in TENANT_COMMANDS)]
    return " ".join(parts)


def server_rule(password: str, prefix: str = DEFAULT_PREFIX, user: str = SERVER_USER) -> str:
    """The ACL file line of the consumers' user: every key under ``prefix``, SERVER_COMMANDS."""
    if not password:
        raise ValueError("the server user needs a password")
    digest = hashlib.sha256(password.encode()).hexdigest()
    parts = ["user", user, "on", "resetchannels", f"#{digest}", f"~{check_prefix(prefix)}:*", "-@all"]
    parts += [f"+{c}" for c in SERVER_COMMANDS]
    return " ".join(parts)


def acl_rules(
    tenants: list,
    *,
    prefix: str = DEFAULT_PREFIX,
    server_password: str | None = None,
    server_user: str = SERVER_USER,
    disable_default: bool = True,
) -> list[str]:
    """The lines of a Redis ACL file for ``tenants`` (dicts or objects with ``name`` and ``keys``,
    the keys as ``sha256:<hex>``): ``user default off`` when ``disable_default``, the server's user
    when ``server_password`` is given, and one user per tenant."""
    check_prefix(prefix)
    lines = ["user default off"] if disable_default else []
    if server_password is not None:
        if server_user == "default" or not re.match(r"^[A-Za-z0-9_.-]{1,64}$", server_user):
            raise ValueError(f"{server_user!r} cannot be the server's Redis user")
        lines.append(server_rule(server_password, prefix, server_user))
    seen: set[str] = set()
    for tenant in tenants:
        name, hashes = _name_and_hashes(tenant)
        if name in seen:
            raise ValueError(f"tenant {name!r} is listed twice")
        if name == server_user:
            raise ValueError(f"tenant {name!r} has the server user's name")
        seen.add(name)
        lines.append(tenant_rule(name, hashes, prefix))
    return lines


def _parse(line: str) -> tuple[str, list[str]] | None:
    tokens = line.split()
    if len(tokens) < 2 or tokens[0] != "user":
        return None
    return tokens[1], tokens[2:]


def apply_acl(redis_client, rules: list[str], *, include_default: bool = False) -> list[str]:
    """Create or replace (``reset`` first) the user of every ``user`` line of ``rules`` in a running
    Redis, with a sync redis-py client allowed to run ``ACL SETUSER``. ``user default ...`` lines
    are skipped unless ``include_default``: switching the default user off from a connection
    logged in as it is best done deliberately. Returns the names of the users set."""
    names = []
    for line in rules:
        parsed = _parse(line)
        if parsed is None:
            continue
        name, user_rules = parsed
        if name == "default" and not include_default:
            continue
        redis_client.execute_command("ACL", "SETUSER", name, "reset", *user_rules)
        names.append(name)
    return names


def remove_users(redis_client, names: Iterable[str]) -> int:
    """Delete Redis users (never ``default``); returns how many existed."""
    names = [n for n in names if n != "default"]
    if not names:
        return 0
    return int(redis_client.execute_command("ACL", "DELUSER", *names))
