-- release.lua: give a slot back (or leave the waiting line), then hand free slots on.
--
-- KEYS[1] - holders ZSET
-- KEYS[2] - waiters ZSET
-- KEYS[3] - waiter expiry ZSET
-- KEYS[4] - meta HASH (an "expire" field, in seconds, makes the waits list expire too)
-- KEYS[5] - waits LIST (ms, newest first, at most 1000)
-- KEYS[6] - ended ZSET: holders whose slot their pool process freed as the body ended
--           (member holder, score = when it is forgotten, ms); a renewal never puts them back
-- ARGV[1] - key name
-- ARGV[2] - holder
-- ARGV[3] - spec (admission.lua; its cap is used only when the family has no meta yet)
-- ARGV[4] - lease TTL in ms (for the leases it grants)
-- ARGV[5] - grant channel prefix
-- ARGV[6] - the calling worker (its own waiters granted now are returned, not published)
-- ARGV[7] - how the run ended, counted in meta: "done", "failed", "retried", "rejected"
--           (counted for a waiter too), or "" (not counted)
-- ARGV[8] - how long it waited for its slot in ms, or -1 (not recorded)
-- ARGV[9] - "1" when the pool process releases as the body ends (the holder is recorded in
--           KEYS[6] for one lease TTL; a wake-up due for the key is published to the holder's
--           worker, {"wake": key, "at": ms, "now": ms}), "" from the worker's main process (a
--           holder in KEYS[6] then returns at once: its pool process did everything)
-- KEYS[#KEYS-2 ..] - the admission keys (admission.lua): a run that ended stops counting as
--                    pending
-- returns {1 when the holder held a slot or waited, 0 when unknown (idempotent),
--          {holders of the calling worker granted now}, {holders reaped now},
--          wake_at (ms, or 0), now (ms, or 0 when nothing was granted)}

local holder = ARGV[2]
local ending = ARGV[9] == '1'
if not ending and redis.call('ZSCORE', KEYS[6], holder) then return {0, {}, {}, 0, 0} end
local spec = flow_spec(ARGV[3])
local worker = ''
if ending then
  local now = now_ms()
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now)
  redis.call('ZADD', KEYS[6], now + tonumber(ARGV[4]), holder)
  redis.call('PEXPIRE', KEYS[6], ARGV[4])  -- the set goes with its last entry
  worker = string.sub(holder, 1, (string.find(holder, ' ', 1, true) or 1) - 1)
end
local held, removed = flow_free(holder, ARGV[7], tonumber(ARGV[8]))
-- Fast path, nobody waiting (in the key, nor in its family): nothing to hand on (expired
-- leases are reaped by the next acquire or by a renewal pass).
if redis.call('ZCARD', KEYS[2]) == 0 and flow_idle(spec) then
  if held > 0 then flow_count(spec, KEYS[4], KEYS[1]) end
  return {removed > 0 and 1 or 0, {}, {}, 0, 0}
end
-- a pool process (ending) cannot report expired leases as lost: it leaves them to a worker
local now, _, _, mine, reaped, wake = grant(ARGV[1], ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6],
  ending and worker or nil, ending)
if ending and wake ~= 0 and worker ~= '' then  -- the pool process cannot wait: its worker does
  local message = cjson.encode({wake = ARGV[1], at = wake, now = now})
  redis.call('PUBLISH', ARGV[5] .. worker, message)
  wake = 0
end
if removed > 0 then return {1, mine, reaped, wake, now} end
return {0, mine, reaped, wake, now}
