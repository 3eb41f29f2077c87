"""Redis ACL users for tenants: each tenant reaches its own keys in Redis and nothing else.

Every tenant gets a Redis user named after it whose password is its API key. Redis ACL files
store a password as ``#<sha256 hex>``, the very hash the tenants file stores (``sha256:<hex>``), so
the rules come from the tenants file without knowing any key. A tenant's user may:

- read the keys of its own namespace, ``{prefix}:{t:<tenant>}:*`` (its jobs, request streams,
  replies, result markers, dead letters, its copy of the limits), and pop its answers from its reply
  lists;
- read, never write, the two keys the consumers publish: ``{prefix}:limits`` and ``{prefix}:judges``;
- write only what the senders' scripts (``referee.scripts``) write, each command on its own keys
  only (ACL selectors, ``TENANT_WRITES``): ``XADD`` on its request streams, ``ZADD`` on its jobs set,
  ``SET`` and ``PEXPIRE`` on its uploads (``blob:*``), ``INCRBY`` and ``PEXPIRE`` on its upload
  counter. No other write: no key of another name, none of another type under these names, nothing
  in its replies, result markers or dead letters;
- run only the commands ``QueueReferee`` uses (``TENANT_COMMANDS`` and those writes), and no
  Pub/Sub channel.

So tenant A can neither read B's prompts (B's streams) nor B's answers, nor push a forged answer
onto B's reply list, nor answer or dead-letter its own messages, nor change the limits. The
consumers log in as ``referee-server`` (``SERVER_COMMANDS`` on ``{prefix}:*``). Redis' ``default``
user is switched off unless asked.

Scripts: a tenant may run a Lua script only with ``EVALSHA``, i.e. one already in Redis' script
cache; it has no ``SCRIPT`` (``LOAD``, ``FLUSH``, ``KILL``...), no ``EVAL`` and no ``FUNCTION`` or
``FCALL``. ``EVAL`` would be a hole, not a convenience: it runs any Lua, and a Lua script runs to its
end while every other client waits (``while true do end`` blocks Redis for all tenants; only
``SCRIPT KILL`` or a restart ends it) and may build strings in Lua's own memory, which ``maxmemory``
does not bound. The consumers load the scripts senders need (``referee.scripts.TENANT_SCRIPTS``) on
every connect; the SDK computes their SHA1s, so it never needs ``EVAL``. Redis cannot confine
``EVALSHA`` to chosen scripts: a tenant may run any cached script, the consumers' own among them.
That grants nothing, because Redis runs a script with its caller's rights: every command a script
calls is checked against the tenant's user like a command sent by hand. Which is also why ``EVALSHA``
cannot be the only way to write: the send script's ``XADD`` and the upload script's ``SET`` are
commands the tenant may send by hand too, without the scripts' checks (message size, backlog caps,
upload size, budget and TTL). Only trusted code may log in as a user with ``SCRIPT LOAD`` (the
server's; and the ``default`` user, off here, which has every right when on).

What the ACL guarantees, then: a tenant writes only streams it reads from, its jobs set, its uploads
and its upload counter, each with one command, in its own namespace. What it does not: the size and
number of those writes. What the consumers bound after the fact (``reward_server.consumer``): a
message over ``queue.max_message_bytes``, not UTF-8, not JSON or of any other shape is dead-lettered
at its first delivery without being loaded, answered, and deleted; uploads are given the upload TTL,
removed when over ``media.max_image_bytes`` and, newest first, while the tenant's uploads exceed
``media.tenant_blob_bytes``; streams no job lists, and keys of the wrong type, are removed. What
stays unbounded but by Redis itself: how fast and how much a tenant writes by hand between two of
the consumers' passes, and its backlog past ``max_backlog``/``max_queued`` (entries of normal size
that it ``XADD``s itself; served at its fair share only, so others are not starved of the judge).
Run Redis with ``maxmemory`` and ``maxmemory-policy noeviction`` (a full Redis refuses writes, the
senders retry until their deadlines and the consumers keep removing what they may), and with
``proto-max-bulk-len`` near the largest message or upload (one command's value then cannot be
hundreds of megabytes). A tenant's jobs set is bounded where it matters: the consumers poll its
``max_jobs_per_tenant`` most recent jobs only, and the send script counts those only.

Selectors need Redis 7.0 or later. ``acl_rules`` makes the lines of an ACL file (``aclfile``),
``apply_acl`` sends them to a running Redis with ``ACL SETUSER`` (``referee redis-acl``),
``remove_users`` deletes users. Nothing here imports redis: the functions take a client.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from .auth import HASH_PREFIX, valid_hash, valid_tenant
from .keys import DEFAULT_PREFIX, Keys, check_prefix

SERVER_USER = "referee-server"

# What QueueReferee sends besides its writes, on the keys of its namespace: the senders' scripts
# by EVALSHA only (the consumers load them; no SCRIPT, EVAL or FUNCTION: a tenant must not run a
# script of its own, see above), BLPOP for the answer, XRANGE and EXISTS for its lost-message check,
# GET and EXISTS for the judges, HGET for the limits, HGETALL and ZREVRANGE for its jobs' health
# reports (``QueueReferee.report``; the servers write them), PING; and what the scripts read (HGET,
# HMGET, XLEN, ZSCORE, ZCARD, ZREVRANGE, EXISTS, GET: a script's commands are checked against its
# caller's user).
# redis-py also sends CLIENT SETINFO on connect: left out on purpose (Redis 7.0 has no such
# subcommand, so an ACL naming it would not load; redis-py ignores its refusal). On Redis Cluster the
# cluster client asks for the slots' owners (CLUSTER SLOTS, SHARDS or NODES, by version; COMMAND for
# the commands' key positions) and sends ASKING after an -ASK redirection during a resharding, and
# READONLY to read from replicas: ``CLUSTER_COMMANDS``, which a single Redis never receives.
TENANT_COMMANDS = (
    "ping",
    "evalsha",
    "hget",
    "hmget",
    "xlen",
    "xrange",
    "zscore",
    "zcard",
    "zrevrange",
    "blpop",
    "exists",
    "get",
    "hgetall",
    *("cluster|slots", "cluster|shards", "cluster|nodes", "command", "asking", "readonly"),
)

# The only writes a tenant's user may make, each on the keys of its namespace named here (after
# ``{prefix}:{t:<tenant>}:``) and nowhere else: what the send script (SEND) and the upload script
# (BLOB) write, since Redis checks a script's commands against its caller's rights.
TENANT_WRITES = (
    ("requests:*", ("xadd",)),  # a message, on its job's stream (SEND)
    ("jobs", ("zadd",)),  # the job, in the jobs set (SEND)
    ("blob:*", ("set", "pexpire")),  # an upload and its TTL (BLOB)
    ("blob-bytes", ("incrby", "pexpire")),  # the upload counter and its TTL (BLOB)
)

# What the consumers send (reward_server.consumer), scripts' own commands included; SCRIPT LOAD
# and SCRIPT EXISTS keep the senders' scripts in Redis' script cache; SCAN, TYPE, PTTL and STRLEN
# find what tenants wrote by hand (never reading a value).
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
    "scan",
    "type",
    "pttl",
    "strlen",
    "rpush",
    "hset",
    "hdel",
    "hget",
    "hgetall",
    "hincrbyfloat",
    "zadd",
    "zrevrange",
    "zremrangebyrank",
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
    *("cluster|slots", "cluster|shards", "cluster|nodes", "command", "asking", "readonly"),
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
    """The ACL file line of one tenant: its reads on its namespace, then one selector per write
    (``(~<keys> +<command>...)``: the command on those keys only)."""
    keys = Keys(check_prefix(prefix), name)
    parts = ["user", name, "on", "resetchannels", *(f"#{h}" for h in hex_hashes), f"~{keys.pattern}"]
    parts += [f"%R~{key}" for key in keys.shared_keys]
    parts += ["-@all", *(f"+{c}" for c in TENANT_COMMANDS)]
    parts += [
        f"(~{keys.namespace}{where} {' '.join(f'+{c}' for c in commands)})"
        for where, commands in TENANT_WRITES
    ]
    return " ".join(parts)


def server_rule(password: str, prefix: str = DEFAULT_PREFIX, user: str = SERVER_USER) -> str:
    """The ACL file line of the consumers' user: every key under ``prefix``, SERVER_COMMANDS."""
    if not password:
        raise ValueError("the server user needs a password")
    if "placeholder" in password.lower():
        raise ValueError(
            "the server user's password is still the manifest's placeholder: set a random one "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
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
    """A ``user`` line's name and rules, a selector (``(...)``, spaces and all) as one rule."""
    tokens: list[str] = []
    for token in line.split():
        if tokens and tokens[-1].startswith("(") and not tokens[-1].endswith(")"):
            tokens[-1] += " " + token
        else:
            tokens.append(token)
    if len(tokens) < 2 or tokens[0] != "user":
        return None
    return tokens[1], tokens[2:]


def apply_acl(redis_client, rules: list[str], *, include_default: bool = False) -> list[str]:
    """Create or replace (``reset`` first) the user of every ``user`` line of ``rules`` in a running
    Redis, with a sync redis-py client allowed to run ``ACL SETUSER``; on a Redis Cluster client, on
    every node, replicas included (Redis does not replicate users, and a promoted replica must know
    them). ``user default ...`` lines are skipped unless ``include_default``: switching the default
    user off from a connection logged in as it is best done deliberately. Returns the names of the
    users set."""
    from .connection import every_node

    nodes = every_node(redis_client)
    names = []
    for line in rules:
        parsed = _parse(line)
        if parsed is None:
            continue
        name, user_rules = parsed
        if name == "default" and not include_default:
            continue
        for node in nodes:
            node.execute_command("ACL", "SETUSER", name, "reset", *user_rules)
        names.append(name)
    _close_others(nodes, redis_client)
    return names


def _close_others(nodes: list, client) -> None:
    for node in nodes:
        if node is not client:
            node.close()


def remove_users(redis_client, names: Iterable[str]) -> int:
    """Delete Redis users (never ``default``); returns how many existed."""
    names = [n for n in names if n != "default"]
    if not names:
        return 0
    from .connection import every_node

    nodes = every_node(redis_client)
    gone = max(int(node.execute_command("ACL", "DELUSER", *names)) for node in nodes)  # on every node
    _close_others(nodes, redis_client)
    return gone
