-- update_call.lua: replace the record of a call that is still live (the tracker adds the answer time).
--
-- KEYS[1]  a2b:{acct:N}:calls    live calls: call id -> hold_micro
-- KEYS[2]  a2b:{acct:N}:call     live calls' records
-- ARGV[1]  call id
-- ARGV[2]  the new record
--
-- Returns 1 when written, 0 when the call is no longer live (settled or released: a late or replayed event
-- must not bring a record back, or the credit guard would count a call that has ended).

if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
