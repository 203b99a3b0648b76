-- body.lua: the body of a run of an adaptive key starts; how many bodies of the key run now.
--
-- A holder counts from its admission, a body only once its pool process runs it: under load
-- the two part by tens of milliseconds, and a cap grown on holders alone climbs past a
-- downstream's capacity without one call too many ever reaching it, until they all start
-- together. adapt.lua grows the cap only on runs that saw the whole cap running at their start.
--
-- KEYS[1] - bodies ZSET (member holder, score: when it stops counting, ms); adapt.lua removes
--           the holder as its run ends
-- ARGV[1] - holder
-- ARGV[2] - how long an entry counts without its end, ms (the lease TTL)
-- returns the bodies running now, this one included
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('ZCARD', KEYS[1])
