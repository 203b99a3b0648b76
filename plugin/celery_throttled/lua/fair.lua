-- fair.lua: a family's fair shares; prepended to every lease script after admission.lua (whose
-- functions it uses), before grant.lua (which calls it when a freed slot's key is in a family).
-- KEYS and the spec are admission.lua's.

-- Round robin over the family's keys with waiters, least recently served first, one slot per
-- key per round (each round in turn order), until the total is reached or no key can take
-- one. Grants to the caller's waiters of this script's own key go into mine; every other grant
-- is published. Returns when the next token is due, when a key could have taken a slot but for
-- its rate.
local function flow_fair(spec, key_name, now, ttl, channel_prefix, caller, mine)
  local family = string.match(key_name, '^(.-)\031')
  local current = string.sub(key_name, #family + 2)
  local base = string.sub(FAMILY, 1, -2)
  flow_count(spec, KEYS[4], KEYS[1])
  if redis.call('ZCARD', KEYS[2]) > 0 then
    redis.call('ZADD', TURNS, 'NX', tonumber(field(KEYS[4], 'served')) or 0, current)
  end
  local total, running = flow_total()
  local wake = nil
  local open = redis.call('ZRANGE', TURNS, 0, -1)
  local turns = {}
  local function earlier(a, b)
    if turns[a] ~= turns[b] then return turns[a] < turns[b] end
    return a < b
  end
  while running < total and #open > 0 do
    local again = {}
    for _, k in ipairs(open) do
      if running >= total then break end
      local prefix = base .. 'k:' .. k
      local h, w, we, m = prefix .. ':h', prefix .. ':w', prefix .. ':we', prefix .. ':m'
      if k ~= current then
        local dead = redis.call('ZRANGEBYSCORE', we, '-inf', now)
        for _, d in ipairs(dead) do
          redis.call('ZREM', w, d); redis.call('ZREM', we, d); redis.call('HDEL', flow_parked(h), d)
        end
      end
      if redis.call('ZCARD', w) == 0 then
        redis.call('ZREM', TURNS, k)
      elseif redis.call('ZCARD', h) < flow_cap(m) then
        local due = flow_due(m)
        local paused = flow_paused(m, now)
        if paused and (not due or paused > due) then due = paused end
        if due and now < due then
          if not wake or due < wake then wake = due end
        else
          flow_take(m, now)
          local holder = redis.call('ZRANGE', w, 0, 0)[1]
          local to = nil
          if k == current then to = mine end
          flow_hand(holder, h, w, we, family .. '\031' .. k, now, ttl, channel_prefix, caller, to)
          flow_count(spec, m, h)
          running = running + 1
          local turn = flow_served(m)
          if redis.call('ZCARD', w) > 0 then
            redis.call('ZADD', TURNS, turn, k)
            turns[k] = turn
            table.insert(again, k)
          else
            redis.call('ZREM', TURNS, k)
          end
        end
      end
    end
    table.sort(again, earlier)
    open = again
  end
  if running < total then return wake end
  return nil
end
