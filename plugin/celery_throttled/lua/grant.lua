-- grant.lua: shared by every script (prepended when the scripts are loaded).
--
-- grant(key_name, cap_arg, ttl, channel_prefix, caller[, claimer[, keep]]) reaps expired
-- holders (unless keep: the caller, a pool process, could not report them; they count until a
-- worker's script reaps them) and waiters of the family KEYS[1..4] (holders, waiters, waiter
-- expiry, meta), then hands
-- free slots to the oldest waiters in ticket order. A grant to one of the calling
-- worker's own waiters is returned to it; any other is published on the waiter's worker
-- channel (channel_prefix .. worker) as the JSON array [key_name, holder].
-- cap_arg is the key's spec (admission.lua): its cap, and its rate, family, pending horizon.
-- The effective cap is meta.override, else the adaptive meta.acap, else meta.cap, else the
-- spec's cap (admission.lua's flow_cap_of). A grant also needs a
-- token of the key's rate, and in a family a place within its total (admission.lua decides
-- which key of the family goes next).
-- Returns now (ms), the effective cap, the number of holders after granting, the list
-- of holders granted to the caller's worker, the holders whose lease expired (their
-- worker died or stalled): the caller reports those tasks as lost, exactly once; and
-- wake_at: when the oldest waiter is blocked only by time (its rate's next token), the
-- Redis time (ms) at which the caller's worker (or the claimer, when given) should run grant()
-- again, or 0 (a rate's next token, or the end of an adaptive key's pause).

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function effective_cap(cap_arg)
  return flow_cap_of(KEYS[4], tonumber(cap_arg))
end

local function remove_all(zset, members)
  for i = 1, #members, 500 do
    redis.call('ZREM', zset, unpack(members, i, math.min(i + 499, #members)))
  end
end

local function grant(key_name, cap_arg, ttl, channel_prefix, caller, claimer, keep)
  local now = now_ms()
  local reaped = {}
  if not keep then reaped = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now) end
  if #reaped > 0 then remove_all(KEYS[1], reaped) end
  local dead = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
  if #dead > 0 then
    remove_all(KEYS[2], dead)
    remove_all(KEYS[3], dead)
    local parked = flow_parked(KEYS[1])
    for i = 1, #dead, 500 do
      redis.call('HDEL', parked, unpack(dead, i, math.min(i + 499, #dead)))
    end
  end
  local spec = flow_spec(cap_arg)
  local cap = effective_cap(spec.cap)
  local running = redis.call('ZCARD', KEYS[1])
  local mine, wake = {}, nil
  if spec.family then
    wake = flow_fair(spec, key_name, now, ttl, channel_prefix, caller, mine)
    running = redis.call('ZCARD', KEYS[1])
  else
    local lucky
    lucky, wake = flow_next(cap - running, now)
    for _, holder in ipairs(lucky) do
      flow_hand(holder, KEYS[1], KEYS[2], KEYS[3], key_name, now, ttl, channel_prefix, caller, mine)
    end
    running = running + #lucky
  end
  return now, cap, running, mine, reaped, flow_claim(spec, wake, claimer or caller)
end
