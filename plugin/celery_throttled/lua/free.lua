-- free.lua: shared by every lease script (prepended after admission.lua and grant.lua).
--
-- flow_free(holder, outcome, waited_ms) gives the slot of holder back (or its place in line) in
-- the family KEYS[1..5] (holders, waiters, waiter expiry, meta, waits): a run that ended stops
-- counting as pending (admission.lua's flow_ended); outcome ("done", "failed", "retried",
-- "rejected", or "" for none) is counted in meta when the holder held a slot ("rejected": a
-- waiter too), and waited_ms (or -1) joins the waits list (newest first, at most 1000).
-- Returns the number of slots it held (0 or 1), and the number of entries removed (slot and
-- place in line). Idempotent: a holder that neither holds nor waits changes nothing but its
-- pending mark. Used by release.lua, and by renew.lua for the releases a renewal carries.

local function flow_free(holder, outcome, waited_ms)
  flow_ended(outcome, holder)
  local held = redis.call('ZREM', KEYS[1], holder)
  local waited = redis.call('ZREM', KEYS[2], holder)
  local removed = held + waited
  redis.call('ZREM', KEYS[3], holder)
  if waited > 0 then redis.call('HDEL', flow_parked(KEYS[1]), holder) end
  if outcome ~= '' and (held > 0 or outcome == 'rejected') then
    redis.call('HINCRBY', KEYS[4], outcome, 1)
    if waited_ms >= 0 then
      redis.call('LPUSH', KEYS[5], waited_ms)
      redis.call('LTRIM', KEYS[5], 0, 999)
      local expire = redis.call('HGET', KEYS[4], 'expire')
      if expire then redis.call('EXPIRE', KEYS[5], expire) end
    end
  end
  return held, removed
end
