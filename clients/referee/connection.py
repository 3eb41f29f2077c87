"""``connect``: one Redis client for every URL referee takes, single instance or Redis Cluster.

The server's consumer, ``QueueReferee``, the CLI (``referee report --redis``, ``referee redis-acl
--apply``) and the benchmarks all make their clients here, so a URL means the same everywhere:

- ``redis://[user:password@]host:port/db`` and ``rediss://...`` (TLS): one Redis (or a managed one
  behind one endpoint that fails over, keeping its name);
- ``redis+cluster://[user:password@]host:port`` and ``rediss+cluster://...``: a Redis Cluster, any of
  its nodes as the seed; redis-py's cluster client (``redis.asyncio.cluster.RedisCluster``) learns the
  slots, routes each command to its slot's primary and follows ``MOVED`` after a failover. A cluster
  has one database: a ``/db`` other than 0 is refused.

Everything referee keeps of one tenant is in that tenant's hash slot (``referee.keys``), so every
script it runs touches one slot, as a cluster requires; what reads several tenants' streams at once
(the consumer's reads) groups them by slot (``key_slot``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.crc import key_slot as _key_slot

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
SCHEMES = ("redis", "rediss", *CLUSTER_SCHEMES)


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def is_cluster(client: Any) -> bool:
    """Whether ``client`` (sync or async) is a Redis Cluster client."""
    from redis.asyncio.cluster import RedisCluster as AsyncCluster
    from redis.cluster import RedisCluster

    return isinstance(client, (AsyncCluster, RedisCluster))


def key_slot(key: str | bytes) -> int:
    """The Redis Cluster hash slot of ``key`` (CRC16 of its hash tag, if any, modulo 16384)."""
    return _key_slot(key.encode() if isinstance(key, str) else key)


def _plain_url(url: str, *, drop_login: bool) -> tuple[str, bool]:
    """``url`` with a ``redis://`` or ``rediss://`` scheme (and without its login when asked), and
    whether it named a cluster."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(
            f"unsupported Redis URL scheme {parts.scheme!r}: use redis://, rediss://, redis+cluster:// "
            "or rediss+cluster://"
        )
    cluster = parts.scheme in CLUSTER_SCHEMES
    scheme = CLUSTER_SCHEMES.get(parts.scheme, parts.scheme)
    netloc = parts.netloc.rpartition("@")[2] if drop_login else parts.netloc
    path = parts.path
    if cluster:
        if path.strip("/") not in ("", "0"):
            raise ValueError(f"a Redis Cluster has one database (0): {path!r} cannot be selected")
        path = ""
    return urlunsplit((scheme, netloc, path, parts.query, parts.fragment)), cluster


def connect(
    url: str,
    *,
    sync: bool = False,
    username: str | None = None,
    password: str | None = None,
    **options: Any,
):
    """A redis-py client for ``url``: ``redis.asyncio.Redis`` (``redis.Redis`` with ``sync``) for
    ``redis://``/``rediss://``, ``redis.asyncio.cluster.RedisCluster`` (``redis.cluster.RedisCluster``)
    for ``redis+cluster://``/``rediss+cluster://``. ``username``/``password`` replace a login in the
    URL; ``options`` are redis-py's (``decode_responses``, ``socket_timeout``, ``retry``...), less
    ``max_connections`` on a cluster where it is per node."""
    login = username is not None or password is not None
    plain, cluster = _plain_url(url, drop_login=login)
    if login:
        options.update(username=username, password=password)
    if cluster:
        if sync:
            from redis.cluster import RedisCluster
        else:
            from redis.asyncio.cluster import RedisCluster
        return RedisCluster.from_url(plain, **options)
    if sync:
        from redis import Redis
    else:
        from redis.asyncio import Redis
    return Redis.from_url(plain, **options)


def every_node(client: Any) -> list:
    """A sync client for every node of a cluster, replicas included (from ``CLUSTER NODES``: redis-py's
    cluster client may know its primaries only), logged in as ``client`` is; ``[client]`` for a
    single Redis. For what Redis does not replicate, such as ACL users: a replica promoted by a
    failover must know them. The caller closes the clients it did not pass in."""
    if not is_cluster(client):
        return [client]
    from redis import Redis

    nodes = client.execute_command("CLUSTER", "NODES", target_nodes=client.get_default_node())
    if isinstance(nodes, dict):  # parsed by redis-py: {"host:port": {...}}
        addresses = [a for a, info in nodes.items() if "fail" not in str(info.get("flags", ""))]
    else:
        text = nodes.decode() if isinstance(nodes, bytes) else str(nodes)
        addresses = [
            line.split()[1].split("@")[0]
            for line in text.splitlines()
            if len(line.split()) > 2 and "fail" not in line.split()[2] and "noaddr" not in line.split()[2]
        ]
    pool = client.get_default_node().redis_connection.connection_pool
    kwargs = {
        k: v
        for k, v in pool.connection_kwargs.items()
        if k in ("username", "password", "socket_timeout", "socket_connect_timeout", "decode_responses")
        or k.startswith("ssl_")
    }
    if "SSL" in getattr(pool, "connection_class", object).__name__:
        kwargs["ssl"] = True
    out = []
    for address in addresses:
        host, _, port = address.rpartition(":")
        out.append(Redis(host=host or "127.0.0.1", port=int(port), **kwargs))
    return out
