"""Who is asking: API keys to tenants, the job a request belongs to, and the open mode's bounds.

With tenants configured every judging route, ``/judges`` and ``/metrics`` need
``Authorization: Bearer <key>`` (or a ``/k/<key>/...`` path, for clients that cannot send headers);
``/healthz`` and ``/readyz`` stay open for orchestrators. Keys are compared by their SHA-256 only
(``referee.auth``). Without tenants the server is open, so it may bind loopback addresses only
unless ``allow_open`` says otherwise.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from dataclasses import dataclass

from fastapi import Request

from referee.auth import OPEN_TENANT, hash_key

from . import metrics
from .errors import ClientError
from .service import DEFAULT_JOB
from .settings import ServerSettings

logger = logging.getLogger(__name__)

JOB_HEADER = "x-referee-job"
_JOB = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
PATH_TOKEN_PREFIX = "/k/"


class UnsafeExposure(RuntimeError):
    """An open server (no keys) asked to listen beyond loopback without ``allow_open``."""


@dataclass(frozen=True)
class Caller:
    tenant: str
    job: str

    def who(self) -> dict:
        return {"tenant": self.tenant, "job": self.job}


class Authenticator:
    def __init__(self, settings: ServerSettings) -> None:
        self.enabled = settings.auth
        self._tenants = {h: t.name for t in settings.tenants for h in t.keys}

    def tenant_for(self, authorization: str | None) -> str:
        if not self.enabled:
            return OPEN_TENANT
        if not authorization:
            raise self._refuse("this server requires an API key: send 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise self._refuse("the Authorization header must be 'Bearer <key>'")
        # A dictionary lookup of the key's SHA-256: the digest reveals nothing about the key, so
        # the lookup's timing cannot be used to guess it.
        tenant = self._tenants.get(hash_key(key))
        if tenant is None:
            raise self._refuse(
                "the API key is not valid (unknown or revoked); ask the judge's operator for one"
            )
        return tenant

    @staticmethod
    def _refuse(message: str) -> ClientError:
        metrics.AUTH_FAILURES.inc()
        return ClientError(401, "unauthorized", message, {"WWW-Authenticate": 'Bearer realm="referee"'})


async def authenticate(request: Request) -> Caller:
    """FastAPI dependency: the request's tenant (401 without a valid key) and job (``X-Referee-Job``,
    default ``default``: a tenant's share is split between its busy jobs)."""
    cached = getattr(request.state, "caller", None)
    if cached is not None:
        return cached
    tenant = getattr(request.state, "tenant", None)  # checked at the edge (app.ObservedApp)
    if tenant is None:
        tenant = request.app.state.authenticator.tenant_for(request.headers.get("authorization"))
    job = request.headers.get(JOB_HEADER) or DEFAULT_JOB
    if not _JOB.match(job):
        raise ClientError(
            400, "bad_request", "X-Referee-Job must be 1-128 characters of letters, digits, '_', '.' or '-'"
        )
    request.state.caller = caller = Caller(tenant, job)
    return caller


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_exposure(settings: ServerSettings) -> None:
    """Refuse to serve without keys on a non-loopback address unless ``allow_open``; say how it runs."""
    if settings.auth:
        logger.info(
            "API keys required: %d tenant(s) (%s)",
            len(settings.tenants),
            ", ".join(f"{t.name} weight {t.weight:g}" for t in settings.tenants),
        )
        return
    if is_loopback(settings.host):
        logger.warning(
            "no tenants are configured: the server runs open (no API keys) and listens on %s only",
            settings.host,
        )
        return
    if not settings.allow_open:
        raise UnsafeExposure(
            f"refusing to listen on {settings.host} without API keys: anyone who can reach it could use "
            "the judge and read its metrics. Configure tenants (`referee keys new TENANT`; `tenants:` in "
            "the config or REFEREE_TENANTS_FILE), bind 127.0.0.1, or pass --allow-open "
            "(REFEREE_ALLOW_OPEN=1) if the network around it is trusted."
        )
    logger.warning(
        "no tenants are configured and allow_open is set: anyone who can reach %s can use the judge",
        settings.host,
    )


def path_token(scope) -> bool:
    """Move a ``/k/<key>/rest`` path's key into an Authorization header and the path to ``/rest``,
    in the request's own scope, so that neither routing nor the access log sees the key. Returns
    False for a ``/k/`` path without a key and a rest."""
    path: str = scope.get("path", "")
    if not path.startswith(PATH_TOKEN_PREFIX):
        return True
    key, sep, rest = path[len(PATH_TOKEN_PREFIX) :].partition("/")
    if not key or not sep:
        return False
    scope["path"] = "/" + rest
    scope["raw_path"] = scope["path"].encode()
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"authorization"]
    headers.append((b"authorization", b"Bearer " + key.encode()))
    scope["headers"] = headers
    return True
