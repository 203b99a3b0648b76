-- unpark.lua: a waiter parked in an idle pool process stops waiting there.
--
-- A parked waiter's pool process marks its holder in the parked HASH (park.lua, with a look at
-- the holders) and blocks on the holder's park list (BLPOP). The grant
-- that admits it (admission.lua's flow_hand, run by whichever script frees a slot anywhere in
-- the cluster) pushes "go" there, so its body starts without its worker dispatching it; the
-- grant is still returned or published to its worker, which then counts it as running. This
-- script takes the mark away: from here on a grant goes to the worker only.
--
-- KEYS[1] - holders ZSET (member holder, score lease expiry ms)
-- KEYS[2] - parked HASH (holder -> the nonce of its park list)
-- KEYS[3] - the holder's park LIST, of this park ("go": run the body; "off": leave unrun)
-- ARGV[1] - holder
-- ARGV[2] - the park list's expiry, ms (the lease TTL)
-- returns 1 when the holder holds its slot already ("go" is, or was, on its list: its body
--         runs), else 0 ("off" is pushed onto its list)

local holder = ARGV[1]
redis.call('HDEL', KEYS[2], holder)
if redis.call('ZSCORE', KEYS[1], holder) then return 1 end
redis.call('RPUSH', KEYS[3], 'off')
redis.call('PEXPIRE', KEYS[3], ARGV[2])
return 0
