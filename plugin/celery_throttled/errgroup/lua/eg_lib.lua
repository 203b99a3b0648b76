-- eg_lib.lua: shared by the errgroup scripts (prepended when they are loaded).
--
-- Every errgroup script takes the group's five keys:
-- KEYS[1] - state HASH (n, limit, terminate, body, errback, parent, cancelled, first_error,
--           errback_sent)
-- KEYS[2] - members LIST (task ids in member order)
-- KEYS[3] - started SET
-- KEYS[4] - settled SET
-- KEYS[5] - done LIST (one element once every member settled)

-- members that neither started nor settled: they will never run
local function unstarted()
  local out = {}
  for _, id in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
    if redis.call('SISMEMBER', KEYS[3], id) == 0 and redis.call('SISMEMBER', KEYS[4], id) == 0 then
      table.insert(out, id)
    end
  end
  return out
end

-- push the group's expiry forward on every key that exists
local function touch(ttl)
  for i = 1, 5 do redis.call('EXPIRE', KEYS[i], ttl) end
end

local function announce_cancel(channel, gid)
  redis.call('PUBLISH', channel, '{"cancel":"' .. gid .. '"}')
end
