"""The Lua scripts that senders (``QueueReferee``) run in Redis, shared by client and consumers.

Tenants may not load scripts: their Redis users have ``EVALSHA`` and no ``SCRIPT``, ``EVAL`` or
``FUNCTION`` (``referee.acl``), since a tenant allowed to load one could run ``while true do end``
and block Redis for every tenant. So a sender can only run a script that is already in Redis'
script cache, by its SHA1: the consumers, logged in as the server's user, load ``TENANT_SCRIPTS``
with ``SCRIPT LOAD`` on every (re)connect and load them again whenever Redis has lost them (a
restart, ``SCRIPT FLUSH``). A sender computes the SHA1 itself (``SEND_SHA``); until a consumer has
loaded the scripts its ``EVALSHA`` gets ``NOSCRIPT``, which ``QueueReferee`` retries until the
request's deadline (an open sender whose user may load scripts loads them itself).

Tenants' Redis users may run these scripts' write commands by hand as well: Redis runs a script with
its caller's rights, so a script cannot do what its caller may not. The ACL therefore allows each
write only on the keys a script writes it to (``referee.acl``), and the consumers bound after the fact
what hand-made writes can leave there (``reward_server.consumer``): a message over the size limit is
dead-lettered unread, an upload without its TTL or over the budget is expired or removed.

Nothing here imports redis.
"""

from __future__ import annotations

import hashlib

# A queued message's largest size in bytes (its JSON) when no consumer has published
# ``max_message_bytes`` (the server's ``QueueSettings.max_message_bytes`` default): a request at the
# server's default limits.max_request_chars (2 million characters) fits, even at three UTF-8 bytes
# a character.
DEFAULT_MAX_MESSAGE_BYTES = 8 << 20

# Append a message unless the sender may not, and mark the job active. Refused: consumers on another
# key layout than the sender's ({7, theirs}: ``referee.keys.KEY_LAYOUT``); a sender without a
# key when the consumers require keys ({2}); a sender with a key when the consumers serve no tenants
# ({4}); a message over the consumers' max_message_bytes (else DEFAULT_MAX_MESSAGE_BYTES, never
# the sender's word: {6, size, cap}); a job's stream at its cap (the consumers' published cap, else
# the sender's: {0, length, cap}); the tenant's job streams together at its max_queued ({3, total,
# cap}); a new job when the tenant already has the consumers' max_jobs jobs ({5, jobs, cap}). XLEN
# counts waiting and in-flight messages: consumers delete what they acknowledge. Returns {1, entry
# id} when sent. The entry has one field, msg: consumers dead-letter any other shape unread.
# KEYS: stream, jobs. ARGV: message, sender's cap, job id, now, tenant, open (1: no key), the
# tenant's stream names' prefix, the tenant's copy of the limits hash (``Keys.tenant_limits``), the
# sender's key layout. The limits are read with one HMGET. The
# limits hash is an argument, not a declared key: Redis' ACL checks a script's declared keys for
# writing, and tenants may only read it. Every key the script touches is in the tenant's hash slot
# (``{t:<tenant>}``), as Redis Cluster requires of a script; the shared limits hash is not, which is
# why the script reads the tenant's copy.
SEND = """
local limits = redis.call('HMGET', ARGV[8], 'key_layout', 'auth', 'max_message_bytes', 'max_backlog',
  'max_jobs', 'max_queued:' .. ARGV[5])
local layout, auth = limits[1], limits[2]
if layout and layout ~= ARGV[9] then
  return {7, layout}
end
if ARGV[6] == '1' and auth == '1' then
  return {2}
end
if ARGV[6] == '0' and auth == '0' then
  return {4}
end
local size = string.len(ARGV[1])
local max_size = tonumber(limits[3]) or DEFAULT_MAX_MESSAGE_BYTES
if size > max_size then
  return {6, size, max_size}
end
local cap = tonumber(limits[4]) or tonumber(ARGV[2])
local n = redis.call('XLEN', KEYS[1])
if cap > 0 and n >= cap then
  return {0, n, cap}
end
local jobs_cap = tonumber(limits[5]) or 0
if jobs_cap > 0 and not redis.call('ZSCORE', KEYS[2], ARGV[3]) then
  local jobs = redis.call('ZCARD', KEYS[2])
  if jobs >= jobs_cap then
    return {5, jobs, jobs_cap}
  end
end
local quota = tonumber(limits[6])
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
""".replace("DEFAULT_MAX_MESSAGE_BYTES", str(DEFAULT_MAX_MESSAGE_BYTES))


# Keep an uploaded image for its TTL, within the limits the consumers publish (never the sender's
# word for them). Refused: no consumer has published the limits ({4}); a file over the size cap
# ({2, size, cap}); the tenant's uploads within the TTL over its byte budget ({3, total, cap}).
# Re-uploading a kept blob renews its TTL and costs nothing. The counter of a tenant's bytes expires
# with its newest upload or renewal, never before a blob it counted: it over-counts (never
# under-counts) what is kept, so a tenant's kept uploads never exceed tenant_blob_bytes (what the
# consumers enforce on uploads made by hand).
# KEYS: blob, the tenant's byte counter. ARGV: the bytes, the tenant's copy of the limits hash
# (read-only to tenants, so an argument rather than a declared key, as in SEND; in the tenant's slot).
BLOB = """
local ttl = tonumber(redis.call('HGET', ARGV[2], 'blob_ttl_ms'))
local cap = tonumber(redis.call('HGET', ARGV[2], 'max_image_bytes'))
local budget = tonumber(redis.call('HGET', ARGV[2], 'tenant_blob_bytes'))
if not (ttl and cap and budget) then
  return {4}
end
local size = string.len(ARGV[1])
if size > cap then
  return {2, size, cap}
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
  return {1, 0, ttl}
end
local used = tonumber(redis.call('GET', KEYS[2])) or 0
if used + size > budget then
  return {3, used + size, budget}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
redis.call('INCRBY', KEYS[2], size)
redis.call('PEXPIRE', KEYS[2], ttl)
return {1, size, ttl}
"""


def sha1(source: str) -> str:
    """The name Redis gives a script in its cache (``SCRIPT LOAD`` returns the same)."""
    return hashlib.sha1(source.encode()).hexdigest()


SEND_SHA = sha1(SEND)
BLOB_SHA = sha1(BLOB)

# Every script a sender runs by EVALSHA, by SHA1: what the consumers load for them.
TENANT_SCRIPTS: dict[str, str] = {SEND_SHA: SEND, BLOB_SHA: BLOB}
