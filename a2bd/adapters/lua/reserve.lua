-- reserve.lua: check the concurrent-call limit and the credit, and register one call, atomically.
--
-- KEYS[1]  a2b:{acct:N}        the account hash (balance, credit_limit, max_calls, ...)
-- KEYS[2]  a2b:{acct:N}:calls  live calls of the account: call id -> "hold_micro:expires_ms"
-- ARGV[1]  call id ("<asterisk>/<uniqueid>")
-- ARGV[2]  hold in micro-units: what the call surely costs if answered (its first billed block)
-- ARGV[3]  now, Unix milliseconds (the caller's clock: Lua may not read the time before Redis 7
--          without breaking script replication)
-- ARGV[4]  expiry, Unix milliseconds: a reservation never settled stops counting after it
--
-- Returns {outcome, credit_micro, live_calls}: outcome is OK, MAXCALLS, NOFUNDS or NOACCOUNT;
-- credit_micro is balance + credit limit less the holds of the account's OTHER live calls.
-- Money fits Lua's doubles exactly up to 2^53 micro-units (9 billion units of currency).
-- Reserving an id that is already live answers again from the same state (Asterisk never runs the
-- AGI twice for one channel, but a retried request must not take a second slot).

local acct, calls = KEYS[1], KEYS[2]
local call_id, hold, now, expires = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]

local fields = redis.call('HMGET', acct, 'balance', 'credit_limit', 'max_calls')
if not fields[1] then
  return {'NOACCOUNT', 0, 0}
end

local held, live, again = 0, 0, false
local entries = redis.call('HGETALL', calls)
for i = 1, #entries, 2 do
  local id, value = entries[i], entries[i + 1]
  local sep = string.find(value, ':', 1, true)
  local exp = tonumber(string.sub(value, sep + 1))
  if exp <= now then
    redis.call('HDEL', calls, id)
  elseif id == call_id then
    again = true
  else
    held = held + tonumber(string.sub(value, 1, sep - 1))
    live = live + 1
  end
end

local credit = tonumber(fields[1]) + tonumber(fields[2]) - held
local max_calls = tonumber(fields[3]) or 0
if again then
  return {'OK', credit, live + 1}
end
if max_calls > 0 and live >= max_calls then
  return {'MAXCALLS', credit, live}
end
if credit < hold then
  return {'NOFUNDS', credit, live}
end
redis.call('HSET', calls, call_id, ARGV[2] .. ':' .. expires)
return {'OK', credit, live + 1}
