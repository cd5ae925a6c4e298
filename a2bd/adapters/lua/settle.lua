-- settle.lua: apply to an account's hot state the ledger lines just written for its calls (idempotent).
--
-- KEYS[1]  a2b:{acct:N}          the account hash: balance, lid (id of the newest ledger line its balance
--                                includes), held, day (UTC YYYYMMDD) and today_s (billed seconds that day)
-- KEYS[2]  a2b:{acct:N}:calls    live calls: call id -> hold_micro
-- KEYS[3]  a2b:{acct:N}:expiry   live calls by expiry
-- KEYS[4]  a2b:{acct:N}:call     live calls' records
-- KEYS[5]  a2b:{acct:N}:ended    ended calls waiting for their ledger line
-- KEYS[6]  a2b:{acct:N}:parked   their prices, held in place of their slots (park.lua)
-- ARGV[1]  id of the newest ledger line of this account among those settled now
-- ARGV[2]  the balance after that line (micro-units)
-- ARGV[3]  today, UTC, YYYYMMDD
-- ARGV[4..] pairs: call id, answered seconds to add to today's count: the writer gives them only for
--          lines its batch wrote (0 for a line written earlier), and never sends the same settle twice
--
-- Idempotent for money and slots. The balance is SET to the newest line's balance_after, never
-- incremented: a line applied twice, two daemons settling out of order, or a settle lost in a crash and
-- followed by a later one all leave the balance equal to PostgreSQL's as of line `lid`. Each call's hold
-- and slot, or its parked price, are freed once (HDEL tells).
-- Returns {calls freed (slots and parked prices), balance now, 1 if the account hash exists else 0}. A
-- missing account hash (Redis restarted empty) is left missing: `a2bd sync` rebuilds it whole, never a
-- partial hash.

local acct, calls, expiry, meta, ended, parked = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local freed, held_down, seconds = 0, 0, 0
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  local hold = redis.call('HGET', calls, id)
  if hold then
    redis.call('HDEL', calls, id)
    redis.call('ZREM', expiry, id)
  else
    hold = redis.call('HGET', parked, id)
    if hold then
      redis.call('HDEL', parked, id)
    end
  end
  if hold then
    held_down = held_down + tonumber(hold)
    freed = freed + 1
  end
  seconds = seconds + tonumber(ARGV[i + 1])
  redis.call('HDEL', meta, id)
  redis.call('HDEL', ended, id)
end
if redis.call('EXISTS', acct) == 0 then
  return {freed, 0, 0}
end
if held_down ~= 0 then
  redis.call('HINCRBY', acct, 'held', -held_down)
end
if seconds > 0 then
  if redis.call('HGET', acct, 'day') == ARGV[3] then
    redis.call('HINCRBY', acct, 'today_s', seconds)
  else
    redis.call('HSET', acct, 'day', ARGV[3], 'today_s', seconds)
  end
end
local lid = tonumber(redis.call('HGET', acct, 'lid')) or 0
if tonumber(ARGV[1]) > lid then
  redis.call('HSET', acct, 'balance', ARGV[2], 'lid', ARGV[1])
end
return {freed, tonumber(redis.call('HGET', acct, 'balance')), 1}
