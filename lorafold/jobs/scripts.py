"""Lua scripts that make each job state change one atomic step inside Redis.

A script runs without interleaving, so "read status, check the move is legal, write the
new fields, append the event" cannot be split by a second worker racing on the same job.
Every value in a job hash is JSON; `event_seq` (a plain counter) numbers the job's events,
and an event's stream id is `<seq>-0` so `events(since=n)` is one XRANGE.

Replies are arrays whose first element says what happened: `ok`, `missing` (no such job,
or another tenant's), `illegal` (with the current status) or `stale` (with the current
attempt count).
"""

from __future__ import annotations

# Shared helper: number the event and append it to the capped per-job stream.
_APPEND_EVENT = """
local function append_event(job_key, events_key, event_json, cap)
  if event_json == '' then return end
  local seq = redis.call('HINCRBY', job_key, 'event_seq', 1)
  redis.call('XADD', events_key, 'MAXLEN', cap, tostring(seq) .. '-0', 'event', event_json)
end
local function one_of(value, words)
  for word in string.gmatch(words, '%S+') do
    if word == value then return true end
  end
  return false
end
"""

# KEYS: job hash, event stream, tenant index.
# ARGV: score, job id, event JSON, event cap, then field/value pairs.
CREATE = _APPEND_EVENT + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists'} end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('HSET', KEYS[1], 'event_seq', 0)
append_event(KEYS[1], KEYS[2], ARGV[3], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[1], ARGV[2])
return {'ok'}
"""

# KEYS: job hash, event stream.
# ARGV: tenant JSON ('' = any), allowed source statuses (space separated),
#       expected attempts ('' = any), '1' to count a new attempt, event JSON, event cap,
#       then field/value pairs to set.
TRANSITION = _APPEND_EVENT + """
local cur = redis.call('HMGET', KEYS[1], 'tenant', 'status', 'attempts')
if not cur[2] then return {'missing'} end
if ARGV[1] ~= '' and cur[1] ~= ARGV[1] then return {'missing'} end
local status = cjson.decode(cur[2])
if not one_of(status, ARGV[2]) then return {'illegal', status} end
if ARGV[3] ~= '' and cur[3] ~= ARGV[3] then return {'stale', cur[3]} end
if #ARGV >= 7 then redis.call('HSET', KEYS[1], unpack(ARGV, 7)) end
if ARGV[4] == '1' then redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
append_event(KEYS[1], KEYS[2], ARGV[5], ARGV[6])
return {'ok', redis.call('HGETALL', KEYS[1])}
"""

# KEYS: job hash, event stream.
# ARGV: progress JSON, stage, event JSON (appended only when the stage changes), event cap,
#       terminal statuses (space separated), expected attempts ('' = any).
PROGRESS = _APPEND_EVENT + """
local cur = redis.call('HMGET', KEYS[1], 'status', 'progress', 'attempts')
if not cur[1] then return {'missing'} end
local status = cjson.decode(cur[1])
if one_of(status, ARGV[5]) then return {'illegal', status} end
if ARGV[6] and ARGV[6] ~= '' and cur[3] ~= ARGV[6] then return {'stale', cur[3]} end
redis.call('HSET', KEYS[1], 'progress', ARGV[1])
local changed = true
if cur[2] then changed = cjson.decode(cur[2])['stage'] ~= ARGV[2] end
if changed then append_event(KEYS[1], KEYS[2], ARGV[3], ARGV[4]) end
return {'ok'}
"""

# KEYS: job hash, event stream.
# ARGV: tenant JSON ('' = any), finished_at JSON, "cancelled" status event JSON,
#       "cancel requested" log event JSON, event cap.
# queued → cancelled now; running → flag set once; cancelled → unchanged; else illegal.
REQUEST_CANCEL = _APPEND_EVENT + """
local cur = redis.call('HMGET', KEYS[1], 'tenant', 'status', 'cancel_requested')
if not cur[2] then return {'missing'} end
if ARGV[1] ~= '' and cur[1] ~= ARGV[1] then return {'missing'} end
local status = cjson.decode(cur[2])
if status == 'queued' then
  redis.call('HSET', KEYS[1], 'status', '"cancelled"', 'finished_at', ARGV[2],
             'cancel_requested', 'true')
  append_event(KEYS[1], KEYS[2], ARGV[3], ARGV[5])
elseif status == 'running' then
  if cur[3] ~= 'true' then
    redis.call('HSET', KEYS[1], 'cancel_requested', 'true')
    append_event(KEYS[1], KEYS[2], ARGV[4], ARGV[5])
  end
elseif status ~= 'cancelled' then
  return {'illegal', status}
end
return {'ok', redis.call('HGETALL', KEYS[1])}
"""

# KEYS: job hash, event stream. ARGV: event JSON, event cap. Log lines for live jobs only.
LOG = _APPEND_EVENT + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
append_event(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
return {'ok'}
"""

# Idempotency: KEYS: the key. ARGV: body hash, completed JSON, ttl seconds.
# Writes the final value unless the key now belongs to a request with another body.
IDEMPOTENCY_COMPLETE = """
local cur = redis.call('GET', KEYS[1])
if cur and cjson.decode(cur)['body_hash'] ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""

# KEYS: the key. ARGV: body hash. Deletes only a pending claim for the same body.
IDEMPOTENCY_RELEASE = """
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local rec = cjson.decode(cur)
if rec['state'] == 'pending' and rec['body_hash'] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

# KEYS: idempotency key. ARGV: body hash, pending TTL (s). Extends our own pending claim.
IDEMPOTENCY_EXTEND = """
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local rec = cjson.decode(cur)
if rec['state'] == 'pending' and rec['body_hash'] == ARGV[1] then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
