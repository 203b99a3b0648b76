-- admission.lua: rates, families, priorities and pending sets; prepended, before fair.lua and
-- grant.lua, to every lease script.
--
-- The last three KEYS of every lease script (after the key's own, whatever their number):
--   KEYS[#KEYS-2] - pending ZSET (member task id, score = when it stops counting, ms)
--   KEYS[#KEYS-1] - the family's HASH (total, override, running, turn, wake); unused outside a
--                   family
--   KEYS[#KEYS]   - the family's turns ZSET (member key with waiters, score = its last turn)
-- The cap argument of every lease script is a spec (celery_throttled/admission.py):
--   "<cap>[ r=<interval ms>/<burst>][ t=<total>][ w=<weight>][ p=<pending horizon ms>]
--    [ a=<min>/<max>/<initial>][ n=<rank>][ f]"
--
-- Rate: GCRA on the key's meta field "tat" (the theoretical arrival time). A start conforms
-- when now >= tat - (burst - 1) * interval, and moves tat one interval on; a start that comes
-- less than one interval late keeps the schedule (so the time a wake-up takes to arrive does not
-- slow the rate down), one later than that restarts it from now.
-- Family: the keys of one family share a hash tag; a freed slot goes to the key with waiters
-- served least recently (its "served" turn), each key within its own cap and rate, all of them
-- within the family's total. A key of weight w (meta "weight", default 1) takes w turns in a row
-- ("streak" counts them) before it goes to the back.
-- Adaptive (a=): the key's cap is its meta field "acap" (a float; the cap is its floor), moved
-- by adapt.lua; "apause" (ms) holds every admission until then (a SlowDown's Retry-After), and
-- the first waiter is woken when it ends, like one blocked by a rate.

local PENDING, FAMILY, TURNS = KEYS[#KEYS - 2], KEYS[#KEYS - 1], KEYS[#KEYS]
local UNCAPPED = 1000000000

local function flow_spec(arg)
  local spec = {cap = 0}
  local first = true
  for token in string.gmatch(arg or '', '%S+') do
    if first then
      spec.cap, spec.cap_text, first = tonumber(token) or 0, token, false
    elseif token == 'f' then
      spec.family = true
    else
      local name, value = string.sub(token, 1, 1), string.sub(token, 3)
      if name == 'r' then spec.rate = value
      elseif name == 't' then spec.total = tonumber(value)
      elseif name == 'w' then spec.weight = value
      elseif name == 'p' then spec.pending = tonumber(value)
      elseif name == 'n' then spec.rank = tonumber(value)
      elseif name == 'a' then spec.adaptive = value
      end
    end
  end
  return spec
end

local function field(hash, name)
  local value = redis.call('HGET', hash, name)
  if value then return value end
  return nil
end

local ADAPTIVE_FIELDS = {'abounds', 'amin', 'amax', 'acap', 'athresh', 'aceil', 'acut',
  'ashort', 'abase', 'apause', 'awhy', 'amoved', 'acuts'}

-- An adaptive cap declared (bounds "min/max/initial"): a fresh key starts its slow start at
-- ceil(initial / 8) within the bounds; new bounds keep the cap, clamped into them. Declared
-- without one, the key's adaptive state goes.
local function flow_adaptive(spec, meta)
  local a = redis.call('HMGET', meta, 'abounds', 'acap')
  if not spec.adaptive then
    if a[1] then redis.call('HDEL', meta, unpack(ADAPTIVE_FIELDS)) end
    return
  end
  if a[1] == spec.adaptive then return end
  local lo, hi, init = string.match(spec.adaptive, '^(%d+)/(%d+)/(%d+)$')
  lo, hi, init = tonumber(lo), tonumber(hi), tonumber(init)
  local cap, why = tonumber(a[2]), 'bounds changed'
  if not cap then
    cap, why = math.ceil(init / 8), 'slow start toward ' .. init
    redis.call('HSET', meta, 'athresh', init)
  end
  cap = math.max(lo, math.min(hi, cap))
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('HSET', meta, 'abounds', spec.adaptive, 'amin', lo, 'amax', hi, 'acap', cap,
    'awhy', why, 'amoved', now)
end

-- What the task declares, kept where every worker's scripts read it.
local function flow_declare(spec, meta)
  if spec.cap <= 0 then return end
  flow_adaptive(spec, meta)
  if field(meta, 'rate') ~= spec.rate then
    if spec.rate then redis.call('HSET', meta, 'rate', spec.rate)
    else redis.call('HDEL', meta, 'rate') end
  end
  if spec.family and field(meta, 'weight') ~= spec.weight then
    if spec.weight then redis.call('HSET', meta, 'weight', spec.weight)
    else redis.call('HDEL', meta, 'weight') end
  end
  if spec.family and spec.total and tonumber(field(FAMILY, 'total')) ~= spec.total then
    redis.call('HSET', FAMILY, 'total', spec.total)
  end
end

-- A waiter's place in line: its rank (priority) first, then first come first served.
local function flow_ticket(spec, meta)
  return (spec.rank or 0) * 1e12 + redis.call('HINCRBY', meta, 'seq', 1)
end

-- The key's rate: interval (ms) and burst, or nil.
local function flow_rate(meta)
  local r = redis.call('HMGET', meta, 'rate_override', 'rate')
  local text = r[1] or r[2]
  if not text or text == '' then return nil end
  local interval, burst = string.match(text, '^([^/]+)/(%d+)$')
  return tonumber(interval), tonumber(burst)
end

-- When the key's next start conforms to its rate (ms); nil when it has no rate.
local function flow_due(meta)
  local interval, burst = flow_rate(meta)
  if not interval then return nil end
  return (tonumber(field(meta, 'tat')) or 0) - (burst - 1) * interval
end

-- One start under the key's rate (when it has one): the schedule moves on, the use is counted.
local function flow_take(meta, now)
  local interval = flow_rate(meta)
  if not interval then return end
  local tat = tonumber(field(meta, 'tat')) or 0
  if now >= tat + interval then tat = now end
  local second = math.floor(now / 1000)
  local use = field(meta, 'use')
  local at, n, before = 0, 0, 0
  if use then at, n, before = string.match(use, '^(%d+) (%d+) (%d+)$') end
  at, n = tonumber(at), tonumber(n)
  if at == second then n = n + 1
  elseif at == second - 1 then before, n = n, 1
  else before, n = 0, 1 end
  redis.call('HSET', meta, 'tat', tat + interval, 'use', second .. ' ' .. n .. ' ' .. before)
end

-- The cap of a key, read from its meta: the pin (override), else the adaptive cap, else the
-- declared one; fallback when it has none of them.
local function flow_cap_of(meta, fallback)
  local c = redis.call('HMGET', meta, 'override', 'acap', 'cap')
  if c[1] then return tonumber(c[1]) end
  if c[2] then return math.floor(tonumber(c[2])) end
  return tonumber(c[3]) or fallback
end

local function flow_cap(meta)
  return flow_cap_of(meta, UNCAPPED)
end

-- Until when (ms) a SlowDown pauses the key's admissions; nil when it does not now.
local function flow_paused(meta, now)
  local until_ms = tonumber(field(meta, 'apause'))
  if until_ms and now < until_ms then return until_ms end
  return nil
end

-- Keeps the family's running total in step with this key's holders.
local function flow_count(spec, meta, holders)
  if not spec.family then return end
  local n = redis.call('ZCARD', holders)
  local was = tonumber(field(meta, 'counted')) or 0
  if n ~= was then
    redis.call('HSET', meta, 'counted', n)
    redis.call('HINCRBY', FAMILY, 'running', n - was)
  end
end

local function flow_total()
  local t = redis.call('HMGET', FAMILY, 'override', 'total', 'running')
  return tonumber(t[1] or t[2]) or UNCAPPED, tonumber(t[3]) or 0
end

-- No key of the family waits (a newcomer may take a free slot without queueing).
local function flow_idle(spec)
  return not spec.family or redis.call('ZCARD', TURNS) == 0
end

-- The key was served now: it goes to the back of the family's round robin once it has taken
-- its weight's worth of turns in a row, and keeps its place until then. Returns its turn.
local function flow_served(meta)
  local weight = tonumber(field(meta, 'weight')) or 1
  if weight > 1 then
    if redis.call('HINCRBY', meta, 'streak', 1) < weight then
      return tonumber(field(meta, 'served')) or 0
    end
    redis.call('HSET', meta, 'streak', 0)
  end
  local turn = redis.call('HINCRBY', FAMILY, 'turn', 1)
  redis.call('HSET', meta, 'served', turn)
  return turn
end

-- The family's total and the key's rate let one more start now; takes the token (and the
-- family's turn) if so.
local function flow_admit(spec, meta, now)
  if flow_paused(meta, now) then return false end
  if spec.family then
    local total, running = flow_total()
    if running >= total then return false end
  end
  local due = flow_due(meta)
  if due and now < due then return false end
  if due then flow_take(meta, now) end  -- no due time: no rate, no token to take
  if spec.family then flow_served(meta) end
  return true
end

-- The parked HASH of the key whose holders are h (keys.py); a holder's entry, the nonce of its
-- park list, goes as it leaves the line: granted (flow_hand) or not (flow_free, reaping).
local PARKED_TTL_MS = 86400000  -- a day after the key's last park (pool/parking.py's)
local function flow_parked(h) return string.sub(h, 1, -2) .. 'pk' end

-- Hands a slot to holder (leaving keys' line); to the caller's worker in mine, or published.
local function flow_hand(holder, h, w, we, key_name, now, ttl, channel_prefix, caller, mine)
  redis.call('ZADD', h, now + ttl, holder)
  redis.call('ZREM', w, holder)
  redis.call('ZREM', we, holder)
  -- a waiter parked in an idle pool process (pool/parking.py) is told "go" on its park list:
  -- its body starts from there, without waiting for its worker to dispatch it
  local parked = flow_parked(h)
  local nonce = redis.call('HGET', parked, holder)
  if nonce then
    redis.call('HDEL', parked, holder)
    local list = parked .. ':' .. holder .. ':' .. nonce
    redis.call('RPUSH', list, 'go')
    redis.call('PEXPIRE', list, ttl)
  end
  local worker = string.sub(holder, 1, string.find(holder, ' ', 1, true) - 1)
  if mine and worker == caller then
    table.insert(mine, holder)
  else
    redis.call('PUBLISH', channel_prefix .. worker, cjson.encode({key_name, holder}))
  end
end

-- Up to n of the oldest waiters of this key that its rate lets start now, their tokens taken;
-- and when the next token is due if the rate stopped them.
local function flow_next(n, now)
  if n <= 0 then return {}, nil end
  local paused = flow_paused(KEYS[4], now)
  if paused then
    if redis.call('ZCARD', KEYS[2]) > 0 then return {}, paused end
    return {}, nil
  end
  local interval, burst = flow_rate(KEYS[4])
  if not interval then return redis.call('ZRANGE', KEYS[2], 0, n - 1), nil end
  local lucky = {}
  for _, holder in ipairs(redis.call('ZRANGE', KEYS[2], 0, math.min(n, burst + 1) - 1)) do
    local due = flow_due(KEYS[4])
    if now < due then return lucky, due end
    flow_take(KEYS[4], now)
    table.insert(lucky, holder)
  end
  return lucky, nil
end

-- Whom to wake when the next token is due: the first worker to learn of a due time pokes;
-- others learning of the same time leave it to that one (the caller '' never pokes). 0: none.
local function flow_claim(spec, due, caller)
  if not due or caller == '' then return 0 end
  due = math.ceil(due)
  local hash = KEYS[4]
  if spec.family then hash = FAMILY end
  local mark = due .. ' ' .. caller
  local claim = field(hash, 'wake')
  if claim and claim ~= mark and tonumber(string.match(claim, '^(%d+)')) == due then return 0 end
  redis.call('HSET', hash, 'wake', mark)
  return due
end

-- The task of a holder ("<worker> <task id>[#n]").
local function flow_task(holder)
  local id = string.match(holder, ' (.*)$') or holder
  return (string.gsub(id, '#%d+$', ''))
end

-- A worker vouches for the pending tasks it holds or runs (the holders in ARGV[first .. last]):
-- they count for another horizon, and one that had stopped counting (its message came back
-- after its worker died) counts again: the count follows what the workers really hold.
local function flow_vouch(spec, first, last, now)
  if not spec.pending then return end
  for i = first, last do
    if not redis.call('ZSCORE', KEYS[6], ARGV[i]) then  -- not one whose body ended (release.lua)
      redis.call('ZADD', PENDING, 'GT', now + spec.pending, flow_task(ARGV[i]))
    end
  end
end

-- A run that ended (not retried, not handed back) stops counting at once.
local function flow_ended(outcome, holder)
  if outcome == 'done' or outcome == 'failed' or outcome == 'rejected' then
    redis.call('ZREM', PENDING, flow_task(holder))
  end
end
