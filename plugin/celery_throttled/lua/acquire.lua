-- acquire.lua: take a slot for a holder, or join the family's waiting line.
--
-- KEYS[1] - holders ZSET (member holder, score lease expiry ms)
-- KEYS[2] - waiters ZSET (member holder, score ticket)
-- KEYS[3] - waiter expiry ZSET (member holder, score expiry ms)
-- KEYS[4] - meta HASH (cap, override, seq, an adaptive cap's acap and apause)
-- KEYS[5] - waits LIST (unused here)
-- KEYS[6] - ended ZSET (release.lua): the holder leaves it (a retry may reuse a holder's name)
-- ARGV[1] - key name (as the application spells it)
-- ARGV[2] - holder ("<worker> <task id>")
-- ARGV[3] - spec: the declared cap (a positive integer) and the rest of the key's admission
--           (admission.lua)
-- ARGV[4] - lease TTL in ms (also the waiter's liveness TTL)
-- ARGV[5] - grant channel prefix
-- ARGV[6] - the calling worker (holders of its own granted now are returned, not published)
-- ARGV[7] - a park nonce, or "": if the holder waits, it is marked parked with it (the parked
--           HASH), so that its worker may park it in an idle pool process (pool/parking.py)
--           with no park.lua call from there; its grant pushes "go" onto that park list
-- ARGV[8 ..] - holder, outcome, waited ms (or -1), for each run of the key that ended (the
--              worker's own release, its safety net), handled first, as renew.lua does: a
--              holder in KEYS[6] was released by its pool process and only leaves KEYS[6]; any
--              other is released (free.lua), its slot going to the line below
-- KEYS[#KEYS-2 ..] - the admission keys (admission.lua)
-- returns {granted (1/0), effective cap, holders, {other holders of this worker granted now},
--          {holders whose lease expired, reaped now}, wake_at (ms, or 0), now (ms)}
--
-- Idempotent: a holder that already holds a slot keeps it (its lease is refreshed); a holder
-- already waiting keeps its ticket. Grants go to the first live waiters in line first (by
-- rank, then ticket), so the caller is granted only when every waiter ahead of it was granted
-- too. The cap and the rate are decided together: a holder never holds a slot while it waits
-- for a token.

local holder, ttl = ARGV[2], tonumber(ARGV[4])
local spec = flow_spec(ARGV[3])
local meta = redis.call('HMGET', KEYS[4], 'cap', 'override')
if meta[1] ~= spec.cap_text then redis.call('HSET', KEYS[4], 'cap', spec.cap_text) end
flow_declare(spec, KEYS[4])
local now = now_ms()
local freed = 0
for i = 8, #ARGV, 3 do
  if redis.call('ZREM', KEYS[6], ARGV[i]) == 0 then
    freed = freed + flow_free(ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]))
  end
end
if freed > 0 then flow_count(spec, KEYS[4], KEYS[1]) end
redis.call('ZREM', KEYS[6], holder)
if redis.call('ZSCORE', KEYS[1], holder) then
  redis.call('ZADD', KEYS[1], now + ttl, holder)
  return {1, effective_cap(spec.cap), redis.call('ZCARD', KEYS[1]), {}, {}, 0, now}
end
-- Fast path, nobody waiting (in the key, nor in its family): take a free slot directly
-- (reaping only when the oldest lease has expired), without passing through the waiting line.
local reaped = {}
if redis.call('ZCARD', KEYS[2]) == 0 and flow_idle(spec) then
  local cap = effective_cap(spec.cap)
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if oldest[2] and tonumber(oldest[2]) <= now then
    reaped = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
    remove_all(KEYS[1], reaped)
    flow_count(spec, KEYS[4], KEYS[1])
  end
  local running = redis.call('ZCARD', KEYS[1])
  if running < cap and flow_admit(spec, KEYS[4], now) then
    redis.call('ZADD', KEYS[1], now + ttl, holder)
    flow_count(spec, KEYS[4], KEYS[1])
    return {1, cap, running + 1, {}, reaped, 0, now}
  end
end
if not redis.call('ZSCORE', KEYS[2], holder) then
  redis.call('ZADD', KEYS[2], flow_ticket(spec, KEYS[4]), holder)
end
redis.call('ZADD', KEYS[3], now + ttl, holder)
local _, cap, running, mine, more, wake = grant(ARGV[1], ARGV[3], ttl, ARGV[5], ARGV[6])
for _, h in ipairs(more) do table.insert(reaped, h) end
local granted, others = 0, {}
if redis.call('ZSCORE', KEYS[1], holder) then
  granted = 1
elseif ARGV[7] ~= '' then  -- kept if marked already: a later park's nonce wins (park.lua)
  local parked = flow_parked(KEYS[1])
  redis.call('HSETNX', parked, holder, ARGV[7])
  redis.call('PEXPIRE', parked, PARKED_TTL_MS)
end
for _, h in ipairs(mine) do
  if h ~= holder then table.insert(others, h) end
end
return {granted, cap, running, others, reaped, wake, now}
