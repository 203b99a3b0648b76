-- eg_settle.lua: a member's envelope was written; count it, and cancel the group on the first
-- envelope that is not ok.
--
-- KEYS[1..5] - the group's keys (see eg_lib.lua)
-- ARGV[1] - the member's task id
-- ARGV[2] - '1' when the envelope is ok, '0' otherwise
-- ARGV[3] - the group's expiry (seconds)
-- ARGV[4] - the cancellation channel
-- ARGV[5] - the group id
-- ARGV[6] - the cancellation reason, should this settle cancel the group
-- returns {status, cancelled_now, errback, body, victims}:
--   status: 1 counted, 0 already counted (a second report of the same member), -1 no such group
--   cancelled_now: 1 when this envelope cancelled the group (it is the first error)
--   errback: the errback signature (JSON) when this caller must send it, else ''
--   body: the body signature (JSON) when every member settled ok and this caller must send it
--   victims: members that will now never start; the caller writes their "cancelled" envelopes
--
-- Each of the errback and the body is handed to exactly one caller: the errback to the first
-- envelope that is not ok, the body to the settle that completes an all-ok group.

if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0, '', '', {}} end
if redis.call('SADD', KEYS[4], ARGV[1]) == 0 then return {0, 0, '', '', {}} end
local ttl = tonumber(ARGV[3])
local cancelled_now, errback, body, victims = 0, '', '', {}
if ARGV[2] == '0' then
  if redis.call('HEXISTS', KEYS[1], 'cancelled') == 0 then
    redis.call('HSET', KEYS[1], 'cancelled', ARGV[6])
    cancelled_now = 1
    victims = unstarted()
    announce_cancel(ARGV[4], ARGV[5])
  end
  if redis.call('HSETNX', KEYS[1], 'first_error', ARGV[1]) == 1 then
    errback = redis.call('HGET', KEYS[1], 'errback') or ''
  end
end
local n = tonumber(redis.call('HGET', KEYS[1], 'n'))
if redis.call('SCARD', KEYS[4]) == n then
  redis.call('RPUSH', KEYS[5], '1')
  if redis.call('HEXISTS', KEYS[1], 'cancelled') == 0 then
    body = redis.call('HGET', KEYS[1], 'body') or ''
  end
end
touch(ttl)
return {1, cancelled_now, errback, body, victims}
