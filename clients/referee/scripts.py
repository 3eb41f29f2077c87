"""The Lua scripts that senders (``QueueReferee``) run in Redis, shared by client and consumers.

Tenants may not load scripts: their Redis users have ``EVALSHA`` and no ``SCRIPT``, ``EVAL`` or
``FUNCTION`` (``referee.acl``), since a tenant allowed to load one could run ``while true do end``
and block Redis for every tenant. So a sender can only run a script that is already in Redis'
script cache, by its SHA1: the consumers, logged in as the server's user, load ``TENANT_SCRIPTS``
with ``SCRIPT LOAD`` on every (re)connect and load them again whenever Redis has lost them (a
restart, ``SCRIPT FLUSH``). A sender computes the SHA1 itself (``SEND_SHA``); until a consumer has
loaded the scripts its ``EVALSHA`` gets ``NOSCRIPT``, which ``QueueReferee`` retries until the
request's deadline (an open sender whose user may load scripts loads them itself).

Nothing here imports redis.
"""

from __future__ import annotations

import hashlib

# Append a message unless the sender may not, and mark the job active. Refused: a sender without a
# key when the consumers require keys ({2}); a sender with a key when the consumers serve no tenants
# ({4}); a job's stream at its cap (the consumers' published cap, else the sender's: {0, length,
# cap}); the tenant's job streams together at its max_queued ({3, total, cap}); a new job when the
# tenant already has the consumers' max_jobs jobs ({5, jobs, cap}). XLEN counts waiting
# and in-flight messages: consumers delete what they acknowledge. Returns {1, entry id} when sent.
# KEYS: stream, jobs. ARGV: message, sender's cap, job id, now, tenant, open (1: no key), the
# tenant's stream names' prefix, the limits hash. The limits hash is an argument, not a declared key:
# Redis' ACL checks a script's declared keys for writing, and tenants may only read it.
SEND = """
local limits = ARGV[8]
local auth = redis.call('HGET', limits, 'auth')
if ARGV[6] == '1' and auth == '1' then
  return {2}
end
if ARGV[6] == '0' and auth == '0' then
  return {4}
end
local cap = tonumber(redis.call('HGET', limits, 'max_backlog')) or tonumber(ARGV[2])
local n = redis.call('XLEN', KEYS[1])
if cap > 0 and n >= cap then
  return {0, n, cap}
end
local jobs_cap = tonumber(redis.call('HGET', limits, 'max_jobs')) or 0
if jobs_cap > 0 and not redis.call('ZSCORE', KEYS[2], ARGV[3]) then
  local jobs = redis.call('ZCARD', KEYS[2])
  if jobs >= jobs_cap then
    return {5, jobs, jobs_cap}
  end
end
local quota = tonumber(redis.call('HGET', limits, 'max_queued:' .. ARGV[5]))
if quota then
  local total = 0
  -- the consumers serve a tenant's max_jobs most recent jobs: those are the ones that count
  local last = jobs_cap > 0 and jobs_cap - 1 or -1
  for _, job in ipairs(redis.call('ZREVRANGE', KEYS[2], 0, last)) do
    total = total + redis.call('XLEN', ARGV[7] .. job)
  end
  if total >= quota then
    return {3, total, quota}
  end
end
local id = redis.call('XADD', KEYS[1], '*', 'msg', ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
return {1, id}
"""


def sha1(source: str) -> str:
    """The name Redis gives a script in its cache (``SCRIPT LOAD`` returns the same)."""
    return hashlib.sha1(source.encode()).hexdigest()


SEND_SHA = sha1(SEND)

# Every script a sender runs by EVALSHA, by SHA1: what the consumers load for them.
TENANT_SCRIPTS: dict[str, str] = {SEND_SHA: SEND}
