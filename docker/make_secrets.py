"""Make the secrets of the compose stack (docker/docker-compose.yml) in docker/secrets/.

    python docker/make_secrets.py [--tenant team-a --tenant team-b] [--force]

Needs only the referee client package. Writes, each file mode 0600 and git-ignored:

- ``tenants.yaml``: the tenants and the SHA-256 of their keys (the server's REFEREE_TENANTS_FILE, and
  what ``referee redis-acl`` makes Redis' users from);
- ``trainer-a.env``, ``trainer-b.env``: REFEREE_API_KEY of the first and second tenant;
- ``redis-server.env``: REFEREE_REDIS_PASSWORD, the password of the server's Redis user;
- ``reward-server.env``: REDIS_URL with that user and password;
- ``hf_token``: empty, for a Hugging Face token (gated models); once written, never replaced.

A key is printed nowhere: give a team its key from its env file. Existing files are kept unless
``--force`` (which replaces every key: restart the whole stack).
"""

from __future__ import annotations

import argparse
import os
import secrets
from pathlib import Path

from referee.acl import SERVER_USER
from referee.auth import hash_key, new_key

SECRETS = Path(__file__).resolve().parent / "secrets"
KEYS = ("tenants.yaml", "trainer-a.env", "trainer-b.env", "redis-server.env", "reward-server.env")
FILES = (*KEYS, "hf_token")


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tenant", action="append", help="tenants (default team-a, team-b)")
    parser.add_argument("--force", action="store_true", help="replace existing secrets")
    args = parser.parse_args()
    tenants = args.tenant or ["team-a", "team-b"]
    if len(tenants) < 2:
        parser.error("give at least two tenants (trainer-a and trainer-b get the first two)")
    SECRETS.mkdir(mode=0o700, exist_ok=True)
    (SECRETS / ".gitignore").write_text("*\n")
    existing = [f for f in KEYS if (SECRETS / f).exists()]
    if existing and not args.force:
        raise SystemExit(f"{SECRETS} already has {', '.join(existing)}; --force replaces them")
    keys = {t: new_key(t) for t in tenants}
    lines = ["tenants:"]
    for tenant, key in keys.items():
        lines += [f"  - name: {tenant}", "    weight: 1.0", "    keys:", f'      - "{hash_key(key)}"']
    _write(SECRETS / "tenants.yaml", "\n".join(lines) + "\n")
    for name, tenant in zip(("trainer-a", "trainer-b"), tenants, strict=False):
        _write(SECRETS / f"{name}.env", f"REFEREE_API_KEY={keys[tenant]}\n")
    password = secrets.token_urlsafe(32)
    _write(SECRETS / "redis-server.env", f"REFEREE_REDIS_PASSWORD={password}\n")
    _write(SECRETS / "reward-server.env", f"REDIS_URL=redis://{SERVER_USER}:{password}@redis:6379/0\n")
    if not (SECRETS / "hf_token").exists():  # the operator's own token is kept, even with --force
        _write(SECRETS / "hf_token", "")
    print(f"wrote {', '.join(KEYS)} to {SECRETS} (tenants: {', '.join(tenants)})")


if __name__ == "__main__":
    main()
