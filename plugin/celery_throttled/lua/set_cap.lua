-- set_cap.lua: set or clear a key's live overrides (cap, rate), then hand on any slots they free.
--
-- KEYS[1] - holders ZSET
-- KEYS[2] - waiters ZSET
-- KEYS[3] - waiter expiry ZSET
-- KEYS[4] - meta HASH
-- KEYS[5] - waits LIST (unused here)
-- KEYS[6] - ended ZSET (unused here)
-- KEYS[#KEYS-2 ..] - the admission keys (admission.lua)
-- ARGV[1] - key name
-- ARGV[2] - the new cap (positive integer), "" to clear the override (back to the
--           declared cap), or "=" to leave it as it is
-- ARGV[3] - lease TTL in ms (for the leases it grants)
-- ARGV[4] - grant channel prefix
-- ARGV[5] - the new rate ("<interval ms>/<burst>"), "" to clear the override, or "=" (or
--           absent) to leave it as it is
-- ARGV[6] - " f" when the key belongs to a family, else "" (or absent)
-- returns {effective cap, holders after granting, holders whose lease expired (reaped now)}
--
-- Raising the cap or the rate grants waiters at once (published to their workers); lowering
-- the cap lets running tasks finish and admits nobody until the count is below the new cap.

if ARGV[2] == '' then
  redis.call('HDEL', KEYS[4], 'override')
elseif ARGV[2] ~= '=' then
  redis.call('HSET', KEYS[4], 'override', ARGV[2])
end
if ARGV[5] == '' then
  redis.call('HDEL', KEYS[4], 'rate_override')
elseif ARGV[5] and ARGV[5] ~= '=' then
  redis.call('HSET', KEYS[4], 'rate_override', ARGV[5])
end
local fallback = (tonumber(ARGV[2]) and ARGV[2] or '0') .. (ARGV[6] or '')
local _, cap, running, _, reaped = grant(ARGV[1], fallback, tonumber(ARGV[3]), ARGV[4], '')
return {cap, running, reaped}
