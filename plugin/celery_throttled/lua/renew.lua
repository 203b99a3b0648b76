-- renew.lua: one worker's heartbeat for one family: extend its leases and its place in line.
--
-- KEYS[1] - holders ZSET
-- KEYS[2] - waiters ZSET
-- KEYS[3] - waiter expiry ZSET
-- KEYS[4] - meta HASH
-- KEYS[5] - waits LIST (unused here)
-- KEYS[6] - ended ZSET (release.lua): holders whose pool process freed their slot already
-- ARGV[1] - key name
-- ARGV[2] - spec (admission.lua): the declared cap, or 0 when the caller does not know it (a
--           reaping pass over a key this worker has no task of, or a wake-up)
-- ARGV[3] - lease TTL in ms
-- ARGV[4] - grant channel prefix
-- ARGV[5] - the calling worker
-- ARGV[6] - n, the number of running holders that follow
-- ARGV[7] - m, the number of ended holders at the end (three arguments each)
-- ARGV[8 .. 7+n]  - holders running a task: their lease is extended; a lease that vanished
--                   (Redis lost its data, or the lease expired during a long stall) is put back,
--                   because the task really is running and must be counted; a holder in
--                   KEYS[6] is skipped (its body ended: extending it would revive the slot)
-- ARGV[8+n .. #ARGV-3m] - holders waiting for a slot: their liveness is extended; one that
--                   vanished from the line is enqueued again
-- ARGV[#ARGV-3m+1 ..]   - holder, outcome, waited ms (or -1), for each run that ended since the
--                   worker's last renewal (the worker's own release, its safety net): a holder
--                   in KEYS[6] was released by its pool process and only leaves KEYS[6]; any
--                   other is released as release.lua releases it (free.lua: its slot freed, its
--                   outcome counted; the grant below hands the slot on)
-- KEYS[#KEYS-2 ..] - the admission keys (admission.lua): the pending tasks of these holders
--                    count for another horizon
-- returns {lost leases put back, waiters granted (found granted, or granted now),
--          holders whose lease expired, reaped now, wake_at (ms, or 0), now (ms)}
--
-- A waiter found among the holders was granted while its worker missed the grant message;
-- it is reported so the worker dispatches it (the pub/sub fallback).

local ttl, n, m = tonumber(ARGV[3]), tonumber(ARGV[6]), tonumber(ARGV[7])
local last = #ARGV - 3 * m  -- the last running or waiting holder
local spec = flow_spec(ARGV[2])
if spec.cap > 0 then redis.call('HSET', KEYS[4], 'cap', spec.cap_text) end
flow_declare(spec, KEYS[4])
local now = now_ms()
local restored, granted = {}, {}
local ended = n > 0 and redis.call('ZCARD', KEYS[6]) > 0
for i = 8, 7 + n do
  if not (ended and redis.call('ZSCORE', KEYS[6], ARGV[i])) then
    if not redis.call('ZSCORE', KEYS[1], ARGV[i]) then table.insert(restored, ARGV[i]) end
    redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
  end
end
for i = 8 + n, last do
  local holder = ARGV[i]
  if redis.call('ZSCORE', KEYS[1], holder) then
    table.insert(granted, holder)
  else
    if not redis.call('ZSCORE', KEYS[2], holder) then
      redis.call('ZADD', KEYS[2], redis.call('HINCRBY', KEYS[4], 'seq', 1), holder)
    end
    redis.call('ZADD', KEYS[3], now + ttl, holder)
  end
end
flow_vouch(spec, 8, last, now)
-- after the running holders: a holder listed in both stays released
for i = last + 1, #ARGV, 3 do
  if redis.call('ZREM', KEYS[6], ARGV[i]) == 0 then
    flow_free(ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]))
  end
end
local _, _, _, mine, reaped, wake = grant(ARGV[1], ARGV[2], ttl, ARGV[4], ARGV[5])
for _, h in ipairs(mine) do table.insert(granted, h) end
return {restored, granted, reaped, wake, now}
