-- set_cap.lua: set or clear a key's live cap override, then hand on any slots it frees.
--
-- KEYS[1] - holders ZSET
-- KEYS[2] - waiters ZSET
-- KEYS[3] - waiter expiry ZSET
-- KEYS[4] - meta HASH
-- KEYS[5] - waits LIST (unused here)
-- ARGV[1] - key name
-- ARGV[2] - the new cap (positive integer), or "" to clear the override (back to the
--           declared cap)
-- ARGV[3] - lease TTL in ms (for the leases it grants)
-- ARGV[4] - grant channel prefix
-- returns {effective cap, holders after granting, holders whose lease expired (reaped now)}
--
-- Raising the cap grants waiters at once (published to their workers); lowering it lets
-- running tasks finish and admits nobody until the count is below the new cap.

if ARGV[2] == '' then
  redis.call('HDEL', KEYS[4], 'override')
else
  redis.call('HSET', KEYS[4], 'override', ARGV[2])
end
local fallback = ARGV[2] ~= '' and ARGV[2] or '0'
local _, cap, running, _, reaped = grant(ARGV[1], fallback, tonumber(ARGV[3]), ARGV[4], '')
return {cap, running, reaped}
