-- park.lua: keep ended calls whose ledger line must wait (PostgreSQL away) and free their slots.
--
-- KEYS[1]  a2b:{acct:N}          the account hash (`held` moves from the calls' first blocks to their prices)
-- KEYS[2]  a2b:{acct:N}:calls    live calls: call id -> hold_micro
-- KEYS[3]  a2b:{acct:N}:expiry   live calls by expiry
-- KEYS[4]  a2b:{acct:N}:call     live calls' records
-- KEYS[5]  a2b:{acct:N}:ended    ended calls waiting for their ledger line: call id -> JSON
-- KEYS[6]  a2b:{acct:N}:parked   ended calls waiting for their ledger line: call id -> price held
-- ARGV     triples: call id, the ended call's JSON, its price in micro-units
--
-- The call is over: it stops counting against max_calls, and it holds its whole price instead of its
-- first block, so the credit left for the account's other calls already counts what it cost although
-- its line is not yet in the balance. settle.lua frees that price when the line is written.
-- Only a call that still holds its slot moves its hold. A call without one (released, expired, settled by
-- another daemon, or kept again after a restart) is only kept: parking twice or after the settle never
-- holds a price twice, nor one whose line is already in the balance. A parked price stays until the line
-- is written, however long that takes (a call PostgreSQL refused waits for `a2bd reconcile`): it is owed.
-- A missing account hash (Redis restarted empty) is not created, and the slot is left for the settle.
-- Returns the number of slots freed.

local acct, calls, expiry, meta, ended, parked = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local exists = redis.call('EXISTS', acct) == 1
local freed, held_up = 0, 0
for i = 1, #ARGV, 3 do
  local id, price = ARGV[i], tonumber(ARGV[i + 2])
  redis.call('HSET', ended, id, ARGV[i + 1])
  redis.call('HDEL', meta, id)
  local hold = redis.call('HGET', calls, id)
  if hold and exists then
    redis.call('HDEL', calls, id)
    redis.call('ZREM', expiry, id)
    redis.call('HSET', parked, id, price)
    held_up = held_up + price - tonumber(hold)
    freed = freed + 1
  end
end
if held_up ~= 0 then
  redis.call('HINCRBY', acct, 'held', held_up)
end
return freed
