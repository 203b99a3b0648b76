-- submit.lua: count a task as pending for its key, unless the key already has max_pending.
--
-- KEYS[1] - pending ZSET (member task id, score = when it stops counting, ms)
-- KEYS[2] - meta HASH (max_pending is kept there for `celery throttle status`)
-- ARGV[1] - task id
-- ARGV[2] - max_pending (positive integer)
-- ARGV[3] - how long it counts from now unless a worker vouches for it again (ms): the
--           pending horizon, plus the time until its eta or countdown
-- returns {1 admitted / 0 refused, tasks pending (after admitting it)}
--
-- Entries past their time leave first, so a task that ended in any way (done, revoked,
-- expired, purged, lost with its worker) stops counting by expiry, not by trust. A task
-- already pending (a retry re-sends its own id) is admitted again, and counts for longer.

local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local until_ms = now + tonumber(ARGV[3])
local known = redis.call('ZSCORE', KEYS[1], ARGV[1])
if redis.call('HGET', KEYS[2], 'max_pending') ~= ARGV[2] then
  redis.call('HSET', KEYS[2], 'max_pending', ARGV[2])
end
if known then
  if tonumber(known) < until_ms then redis.call('ZADD', KEYS[1], until_ms, ARGV[1]) end
  return {1, redis.call('ZCARD', KEYS[1])}
end
local pending = redis.call('ZCARD', KEYS[1])
if pending >= tonumber(ARGV[2]) then return {0, pending} end
redis.call('ZADD', KEYS[1], until_ms, ARGV[1])
return {1, pending + 1}
