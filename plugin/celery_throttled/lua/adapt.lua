-- adapt.lua: one run's outcome moves its key's adaptive cap (docs/guide/adaptive.md).
--
-- KEYS[1] - holders ZSET (the run reporting is still among them)
-- KEYS[2] - waiters ZSET
-- KEYS[3] - meta HASH: acap (the cap, a float: admissions use its floor), amin, amax,
--           athresh (slow start goes on until this), aceil (the count at the last cut),
--           acut (when it was, ms), ashort / abase (latency: recent, baseline, ms),
--           apause (no admission before, ms), awhy / amoved (the last move of the cap's
--           integer value, and when), acuts (cuts so far), override (a pin)
-- ARGV[1] - "ok", "overloaded" or "slowdown"
-- ARGV[2] - the body's latency in ms (its start is taken as now - latency, in Redis time)
-- ARGV[3] - for "slowdown", the Retry-After in ms: no admission on the key until now + it
-- KEYS[4], ARGV[4], ARGV[5] (optional) - the bodies ZSET (lua/body.lua), how many bodies ran as
--           this one started (-1: not known), and its holder (it leaves the bodies)
-- returns {the cap now (integer), the cap (float, as text), why it last moved}, or {0, '', ''}
--          when the key has no adaptive cap
--
-- Constants (and why: docs/guide/adaptive.md):
--   BETA 0.7     an overload cuts to 0.7 x min(cap, running): the level that failed, backed off
--   GAIN 0.5     in slow start a success adds 0.5: the cap grows 1.5x each round trip, so the
--                first level that fails is at most 1.5x the last that succeeded whole (TCP
--                doubles); an overload then cuts to 1 / 1.5 of the level (the capacity lies
--                between that and the level), the ceiling just above: the probe goes on
--                slowly from there
--   TRIM 0.9     a latency twice the baseline trims to 0.9 x: the downstream queues, gently
--   PROBE 16     within one of the last ceiling a success adds 1/(16 cap): a probe of the level
--                that failed every 16 round trips, instead of every one
--   SHORT 0.25   recent latency: an average of about the last 4 runs
--   UP 0.01, DOWN 0.1  the baseline follows the recent latency up over ~100 runs, down over ~10
--   STUCK 0.001  ... but up over ~1000 runs while the recent latency is 1.3x it or more: the
--                cap's own growth must not drag the baseline along (the hold would lift, the
--                cap grow, the latency rise, and so on); a downstream that is slower for good
--                becomes the new normal all the same
--   HOLD 1.3, CUT 2.0  recent / baseline at which growth stops, and at which the cap is trimmed
--   SLACK 5      ms of latency difference always tolerated (timer noise of short tasks)
-- A cut needs the reporting run to have started after the last cut: runs that fail together
-- (admitted before the cap came down) cut once; a run admitted under the new cap that still
-- fails cuts again, so a sharp drop in capacity is followed within a few round trips.

local BETA, TRIM, PROBE, GAIN = 0.7, 0.9, 16, 0.5
local SHORT, UP, DOWN, STUCK = 0.25, 0.01, 0.1, 0.001
local HOLD, CUT, SLACK = 1.3, 2.0, 5

local meta = KEYS[3]
local outcome, latency = ARGV[1], math.max(0, tonumber(ARGV[2]) or 0)
local seen = tonumber(ARGV[4]) or -1
if KEYS[4] and ARGV[5] then redis.call('ZREM', KEYS[4], ARGV[5]) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local m = redis.call('HMGET', meta, 'acap', 'amin', 'amax', 'athresh', 'aceil', 'acut',
  'ashort', 'abase', 'override', 'apause', 'awhy')
if not m[1] then return {0, '', ''} end
local cap, lo, hi = tonumber(m[1]), tonumber(m[2]), tonumber(m[3])
local thresh, ceiling, cut_at = tonumber(m[4]), tonumber(m[5]), tonumber(m[6]) or 0
local short, base = tonumber(m[7]), tonumber(m[8])
local before, why, moved = math.floor(cap), nil, false

if outcome == 'slowdown' then
  local until_ms = now + math.max(0, tonumber(ARGV[3]) or 0)
  if until_ms > (tonumber(m[10]) or 0) then redis.call('HSET', meta, 'apause', until_ms) end
end
if m[9] then return {tonumber(m[9]), tostring(cap), 'pinned by celery throttle set'} end

local running = redis.call('ZCARD', KEYS[1])

local function clamp(x) return math.max(lo, math.min(hi, x)) end

-- Cut to factor x the level that failed, once per round trip; that level is the new ceiling.
local function cut(factor, reason)
  if now - latency < cut_at then return end
  local level = math.max(1, math.min(cap, running))
  local ceiling_at = level
  if thresh then
    -- slow start grew the cap 1.5x in the last round trip: the capacity is between the level
    -- before that and the level; go back to it, and probe slowly from just above
    cap = clamp(level / (1 + GAIN))
    ceiling_at = math.floor(cap) + 1
  else
    cap = clamp(level * factor)
  end
  redis.call('HSET', meta, 'acap', cap, 'aceil', ceiling_at, 'acut', now)
  redis.call('HDEL', meta, 'athresh')
  redis.call('HINCRBY', meta, 'acuts', 1)
  why, moved = reason .. ' at ' .. math.floor(level) .. ' running', true
end

if outcome == 'overloaded' then
  cut(BETA, 'overloaded')
elseif outcome == 'slowdown' then
  cut(BETA, 'slow down ' .. string.format('%.3g', tonumber(ARGV[3]) / 1000) .. 's')
elseif outcome == 'ok' then
  if short then short = short + (latency - short) * SHORT else short = latency end
  if not base then base = short
  elseif short < base then base = base + (short - base) * DOWN
  elseif short < HOLD * base then base = base + (short - base) * UP
  else base = base + (short - base) * STUCK end
  redis.call('HSET', meta, 'ashort', short, 'abase', base)
  local over = short - base > SLACK
  if over and short >= CUT * base then
    cut(TRIM, string.format('latency %.1fx its baseline', short / base))
  elseif over and short >= HOLD * base then
    -- latency rising: hold (said once, when the hold begins)
    if string.sub(m[11] or '', 1, 4) ~= 'held' then
      why, moved = string.format('held: latency %.1fx its baseline', short / base), true
    end
  elseif running + redis.call('ZCARD', KEYS[2]) >= math.floor(cap)
      and (seen < 0 or seen >= math.floor(cap)) then
    -- the cap is in use: enough holders, and (when known) this run started beside a whole
    -- cap of running bodies; holders admitted but not yet running are no evidence
    if thresh and cap < thresh then
      cap, why = math.min(cap + GAIN, thresh), 'slow start toward ' .. thresh
      if cap >= thresh then redis.call('HDEL', meta, 'athresh') end
    elseif ceiling and cap >= ceiling - 1 and cap < ceiling then
      cap, why = cap + 1 / (PROBE * cap), 'probing ' .. ceiling .. ' (where it last failed)'
    else
      cap, why = cap + 1 / cap, 'grew: no overload, latency steady'
    end
    cap = clamp(cap)
    redis.call('HSET', meta, 'acap', cap)
  end
end
if why and (moved or math.floor(cap) ~= before) then
  redis.call('HSET', meta, 'awhy', why, 'amoved', now)
  return {math.floor(cap), tostring(cap), why}
end
return {math.floor(cap), tostring(cap), m[11] or ''}
