-- release.lua: drop one live call's reservation without billing it (idempotent).
--
-- KEYS[1]  a2b:{acct:N}          the account hash (its `held` total goes down by the call's hold)
-- KEYS[2]  a2b:{acct:N}:calls    live calls: call id -> hold_micro
-- KEYS[3]  a2b:{acct:N}:expiry   live calls by expiry
-- KEYS[4]  a2b:{acct:N}:call     live calls' records
-- ARGV[1]  call id
--
-- Returns 1 when the call was live, 0 when it was not (already released, settled or expired).

redis.call('HDEL', KEYS[4], ARGV[1])
local hold = redis.call('HGET', KEYS[2], ARGV[1])
if not hold then
  return 0
end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'held', -tonumber(hold))
return 1
