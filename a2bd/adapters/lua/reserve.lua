-- reserve.lua: check the concurrent-call limit and the credit, and register one call, atomically.
--
-- KEYS[1]  a2b:{acct:N}          the account hash: balance, credit_limit, max_calls, and `held`, the
--                                sum of the holds of its live calls (kept by this script and release.lua)
-- KEYS[2]  a2b:{acct:N}:calls    live calls: call id -> hold_micro
-- KEYS[3]  a2b:{acct:N}:expiry   live calls by expiry: call id scored by Unix ms
-- ARGV[1]  call id ("<asterisk>/<uniqueid>")
-- ARGV[2]  hold in micro-units: what the call surely costs if answered (its first billed block)
-- ARGV[3]  now, Unix milliseconds (the caller's clock: scripts replicate by effect but stay testable)
-- ARGV[4]  expiry, Unix milliseconds: a reservation never settled stops counting after it
-- ARGV[5]  the account version the caller decided on (field `v`, bumped by every load from PostgreSQL),
--          or "" to skip the check
--
-- Returns {outcome, credit_micro, live_calls}: outcome is OK, MAXCALLS, NOFUNDS, NOACCOUNT, or STALE when
-- the account changed since the caller read it (nothing is reserved: read it again and retry);
-- credit_micro is balance + credit limit less the holds of the account's OTHER live calls.
-- Cost: O(log n) in the account's live calls, plus O(1) per expired reservation purged.
-- Money fits Lua's doubles exactly up to 2^53 micro-units (9 billion units of currency).
-- Reserving an id that is already live answers again from the same state (Asterisk never runs the
-- AGI twice for one channel, but a retried request must not take a second slot).

local acct, calls, expiry = KEYS[1], KEYS[2], KEYS[3]
local call_id, hold, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])

local fields = redis.call('HMGET', acct, 'balance', 'credit_limit', 'max_calls', 'held', 'v')
if not fields[1] then
  return {'NOACCOUNT', 0, 0}
end
if ARGV[5] ~= '' and ARGV[5] ~= fields[5] then
  return {'STALE', 0, 0}
end
local held = tonumber(fields[4]) or 0

local expired = redis.call('ZRANGEBYSCORE', expiry, '-inf', now)
for _, id in ipairs(expired) do
  held = held - (tonumber(redis.call('HGET', calls, id)) or 0)
  redis.call('HDEL', calls, id)
  redis.call('ZREM', expiry, id)
end
if #expired > 0 then
  redis.call('HSET', acct, 'held', held)
end

local live = redis.call('HLEN', calls)
local own = redis.call('HGET', calls, call_id)
if own then
  return {'OK', tonumber(fields[1]) + tonumber(fields[2]) - (held - tonumber(own)), live}
end

local credit = tonumber(fields[1]) + tonumber(fields[2]) - held
local max_calls = tonumber(fields[3]) or 0
if max_calls > 0 and live >= max_calls then
  return {'MAXCALLS', credit, live}
end
if credit < hold then
  return {'NOFUNDS', credit, live}
end
redis.call('HSET', calls, call_id, hold)
redis.call('ZADD', expiry, ARGV[4], call_id)
redis.call('HINCRBY', acct, 'held', hold)
return {'OK', credit, live + 1}
