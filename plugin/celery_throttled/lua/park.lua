-- park.lua: a waiter's pool process marks it parked, before it blocks on its park list.
--
-- KEYS[1] - holders ZSET (member holder, score lease expiry ms)
-- KEYS[2] - parked HASH (holder -> the nonce of its park list): a grant to a holder in it
--           pushes "go" onto its park list (admission.lua's flow_hand)
-- KEYS[3] - the holder's park LIST, of this park
-- ARGV[1] - holder
-- ARGV[2] - nonce (the park list's name ends with it)
-- ARGV[3] - how long the parked hash lives after its last park, ms
-- returns "go" when the holder holds its slot already (granted before it was marked: its body
--         runs now), else what its list holds first ("off": unparked before it was marked;
--         taken from the list), or false: it waits
local holder = ARGV[1]
redis.call('HSET', KEYS[2], holder, ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
if redis.call('ZSCORE', KEYS[1], holder) then
  redis.call('HDEL', KEYS[2], holder)
  return 'go'
end
return redis.call('LPOP', KEYS[3])
