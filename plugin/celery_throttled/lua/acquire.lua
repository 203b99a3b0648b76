-- acquire.lua: take a slot for a holder, or join the family's waiting line.
--
-- KEYS[1] - holders ZSET (member holder, score lease expiry ms)
-- KEYS[2] - waiters ZSET (member holder, score ticket)
-- KEYS[3] - waiter expiry ZSET (member holder, score expiry ms)
-- KEYS[4] - meta HASH (cap, override, seq)
-- ARGV[1] - key name (as the application spells it)
-- ARGV[2] - holder ("<worker> <task id>")
-- ARGV[3] - declared cap (positive integer)
-- ARGV[4] - lease TTL in ms (also the waiter's liveness TTL)
-- ARGV[5] - grant channel prefix
-- ARGV[6] - the calling worker (holders of its own granted now are returned, not published)
-- returns {granted (1/0), effective cap, holders, {other holders of this worker granted now},
--          {holders whose lease expired, reaped now}}
--
-- Idempotent: a holder that already holds a slot keeps it (its lease is refreshed); a holder
-- already waiting keeps its ticket. Grants go to the oldest live waiters first, so the caller
-- is granted only when every waiter ahead of it was granted too.

local holder, ttl = ARGV[2], tonumber(ARGV[4])
local meta = redis.call('HMGET', KEYS[4], 'cap', 'override')
if meta[1] ~= ARGV[3] then redis.call('HSET', KEYS[4], 'cap', ARGV[3]) end
local now = now_ms()
if redis.call('ZSCORE', KEYS[1], holder) then
  redis.call('ZADD', KEYS[1], now + ttl, holder)
  return {1, effective_cap(ARGV[3]), redis.call('ZCARD', KEYS[1]), {}, {}}
end
-- Fast path, nobody waiting: take a free slot directly (reaping only when the oldest lease
-- has expired), without passing through the waiting line.
if redis.call('ZCARD', KEYS[2]) == 0 then
  local cap = tonumber(meta[2] or ARGV[3])
  local reaped = {}
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if oldest[2] and tonumber(oldest[2]) <= now then
    reaped = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
    remove_all(KEYS[1], reaped)
  end
  local running = redis.call('ZCARD', KEYS[1])
  if running < cap then
    redis.call('ZADD', KEYS[1], now + ttl, holder)
    return {1, cap, running + 1, {}, reaped}
  end
  if #reaped > 0 then
    -- the slow path below reaps nothing more; report these now
    redis.call('ZADD', KEYS[2], redis.call('HINCRBY', KEYS[4], 'seq', 1), holder)
    redis.call('ZADD', KEYS[3], now + ttl, holder)
    return {0, cap, running, {}, reaped}
  end
end
if not redis.call('ZSCORE', KEYS[2], holder) then
  redis.call('ZADD', KEYS[2], redis.call('HINCRBY', KEYS[4], 'seq', 1), holder)
end
redis.call('ZADD', KEYS[3], now + ttl, holder)
local _, cap, running, mine, reaped = grant(ARGV[1], ARGV[3], ttl, ARGV[5], ARGV[6])
local granted, others = 0, {}
if redis.call('ZSCORE', KEYS[1], holder) then granted = 1 end
for _, h in ipairs(mine) do
  if h ~= holder then table.insert(others, h) end
end
return {granted, cap, running, others, reaped}
