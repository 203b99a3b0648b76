-- grant.lua: shared by every script (prepended when the scripts are loaded).
--
-- grant(key_name, cap_arg, ttl, channel_prefix, caller) reaps expired holders and
-- waiters of the family KEYS[1..4] (holders, waiters, waiter expiry, meta), then hands
-- free slots to the oldest waiters in ticket order. A grant to one of the calling
-- worker's own waiters is returned to it; any other is published on the waiter's worker
-- channel (channel_prefix .. worker) as the JSON array [key_name, holder].
-- The effective cap is meta.override, else meta.cap, else cap_arg.
-- Returns now (ms), the effective cap, the number of holders after granting, the list
-- of holders granted to the caller's worker, and the holders whose lease expired (their
-- worker died or stalled): the caller reports those tasks as lost, exactly once.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function effective_cap(cap_arg)
  local override = redis.call('HGET', KEYS[4], 'override')
  if override then return tonumber(override) end
  local declared = redis.call('HGET', KEYS[4], 'cap')
  if declared then return tonumber(declared) end
  return tonumber(cap_arg)
end

local function remove_all(zset, members)
  for i = 1, #members, 500 do
    redis.call('ZREM', zset, unpack(members, i, math.min(i + 499, #members)))
  end
end

local function grant(key_name, cap_arg, ttl, channel_prefix, caller)
  local now = now_ms()
  local reaped = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
  if #reaped > 0 then remove_all(KEYS[1], reaped) end
  local dead = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
  if #dead > 0 then
    remove_all(KEYS[2], dead)
    remove_all(KEYS[3], dead)
  end
  local cap = effective_cap(cap_arg)
  local running = redis.call('ZCARD', KEYS[1])
  local free = cap - running
  local mine = {}
  if free > 0 then
    local lucky = redis.call('ZRANGE', KEYS[2], 0, free - 1)
    for _, holder in ipairs(lucky) do
      redis.call('ZADD', KEYS[1], now + ttl, holder)
      redis.call('ZREM', KEYS[2], holder)
      redis.call('ZREM', KEYS[3], holder)
      local worker = string.sub(holder, 1, string.find(holder, ' ', 1, true) - 1)
      if worker == caller then
        table.insert(mine, holder)
      else
        redis.call('PUBLISH', channel_prefix .. worker, cjson.encode({key_name, holder}))
      end
    end
    running = running + #lucky
  end
  return now, cap, running, mine, reaped
end
