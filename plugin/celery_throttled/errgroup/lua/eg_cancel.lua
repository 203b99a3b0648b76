-- eg_cancel.lua: cancel a group from outside (the caller, or a cancelled parent).
--
-- KEYS[1..5] - the group's keys (see eg_lib.lua)
-- ARGV[1] - the reason
-- ARGV[2] - the group's expiry (seconds)
-- ARGV[3] - the cancellation channel
-- ARGV[4] - the group id
-- returns {status, victims}: status 1 cancelled now, 0 already cancelled, -1 no such group;
--   victims: members that will now never start; the caller writes their "cancelled" envelopes

if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, {}} end
if redis.call('HEXISTS', KEYS[1], 'cancelled') == 1 then return {0, {}} end
redis.call('HSET', KEYS[1], 'cancelled', ARGV[1])
announce_cancel(ARGV[3], ARGV[4])
touch(tonumber(ARGV[2]))
return {1, unstarted()}
