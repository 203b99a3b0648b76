-- eg_start.lua: a member is about to be handed to a pool; may it start?
--
-- KEYS[1..5] - the group's keys (see eg_lib.lua)
-- ARGV[1] - the member's task id
-- ARGV[2] - the group's expiry (seconds)
-- returns 1: started (recorded); 0: the group is cancelled and the member already settled;
--         2: the group is cancelled and the member has no envelope yet (the caller writes a
--         "cancelled" one); -1: no such group (expired or never registered)
--
-- Atomic with eg_cancel.lua: a member either starts before the cancellation (and is then
-- told through current_context().cancelled) or never starts.

if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HEXISTS', KEYS[1], 'cancelled') == 1 then
  if redis.call('SISMEMBER', KEYS[4], ARGV[1]) == 1 then return 0 end
  return 2
end
redis.call('SADD', KEYS[3], ARGV[1])
touch(tonumber(ARGV[2]))
return 1
