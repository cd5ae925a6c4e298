-- reserve.lua: check the concurrent-call limit and the credit, and register one call, atomically.
--
-- KEYS[1]  a2b:{acct:N}          the account hash: balance, credit_limit, max_calls, and `held`, the
--                                sum of the holds of its live calls and of the prices of its ended calls
--                                waiting for their ledger line (kept by this script, release.lua,
--                                park.lua and settle.lua)
-- KEYS[2]  a2b:{acct:N}:calls    live calls: call id -> hold_micro
-- KEYS[3]  a2b:{acct:N}:expiry   live calls by expiry: call id scored by Unix ms
-- KEYS[4]  a2b:{acct:N}:call     live calls: call id -> what rating needs (JSON written by the daemon:
--                                rate, routes, destination; the tracker adds the answer time)
-- ARGV[1]  call id ("<asterisk>/<uniqueid>")
-- ARGV[2]  hold in micro-units: what the call surely costs if answered (its first billed block)
-- ARGV[3]  now, Unix milliseconds (the caller's clock: scripts replicate by effect but stay testable)
-- ARGV[4]  expiry, Unix milliseconds: a reservation never settled stops counting after it
-- ARGV[5]  the account version the caller decided on (field `v`, bumped by every load from PostgreSQL),
--          or "" to skip the check
-- ARGV[6]  the call's record for KEYS[4] ("" to store none)
-- ARGV[7]  today, UTC, YYYYMMDD: the day the account's daily minute limit counts in ("" = not checked)
--
-- Returns {outcome, credit_micro, live_calls, daily_left_s}: outcome is OK, MAXCALLS, NOFUNDS, DAILYLIMIT
-- (the account's billed seconds today reached its daily_limit_s), NOACCOUNT, or STALE when
-- the account changed since the caller read it (nothing is reserved: read it again and retry);
-- credit_micro is balance + credit limit less `held` but for this call's own hold; daily_left_s
-- the seconds left today under the daily limit, -1 when the account has none.
-- Cost: O(log n) in the account's live calls, plus O(1) per expired reservation purged.
-- Money fits Lua's doubles exactly up to 2^53 micro-units (9 billion units of currency). An account whose
-- balance, credit limit or holds reach that is refused with an error reply (the caller fails closed and
-- logs it), never answered from an inexact sum.
-- Reserving an id that is already live answers again from the same state (Asterisk never runs the
-- AGI twice for one channel, but a retried request must not take a second slot).

local acct, calls, expiry, meta = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local call_id, hold, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])

local fields = redis.call('HMGET', acct, 'balance', 'credit_limit', 'max_calls', 'held', 'v',
                         'daily_limit_s', 'day', 'today_s')
if not fields[1] then
  return {'NOACCOUNT', 0, 0, -1}
end
if ARGV[5] ~= '' and ARGV[5] ~= fields[5] then
  return {'STALE', 0, 0, -1}
end
local daily_left = -1
local daily_limit = tonumber(fields[6]) or 0
if daily_limit > 0 and ARGV[7] ~= '' then
  local used = 0
  if fields[7] == ARGV[7] then
    used = tonumber(fields[8]) or 0
  end
  daily_left = math.max(daily_limit - used, 0)
end
local balance, limit, held = tonumber(fields[1]), tonumber(fields[2]) or 0, tonumber(fields[4]) or 0
local exact = 9007199254740992  -- 2^53
if math.abs(balance) >= exact or math.abs(limit) >= exact or math.abs(held) >= exact or math.abs(hold) >= exact then
  return redis.error_reply('a2bd: ' .. acct .. ' holds money past 2^53 micro-units, beyond exact Lua numbers')
end

local expired = redis.call('ZRANGEBYSCORE', expiry, '-inf', now)
for _, id in ipairs(expired) do
  held = held - (tonumber(redis.call('HGET', calls, id)) or 0)
  redis.call('HDEL', calls, id)
  redis.call('ZREM', expiry, id)
  redis.call('HDEL', meta, id)
end
if #expired > 0 then
  redis.call('HSET', acct, 'held', held)
end

local live = redis.call('HLEN', calls)
local own = redis.call('HGET', calls, call_id)
if own then
  return {'OK', balance + limit - (held - tonumber(own)), live, daily_left}
end

local credit = balance + limit - held
local max_calls = tonumber(fields[3]) or 0
if max_calls > 0 and live >= max_calls then
  return {'MAXCALLS', credit, live, daily_left}
end
if daily_left == 0 then
  return {'DAILYLIMIT', credit, live, 0}
end
if credit < hold then
  return {'NOFUNDS', credit, live, daily_left}
end
redis.call('HSET', calls, call_id, hold)
redis.call('ZADD', expiry, ARGV[4], call_id)
redis.call('HINCRBY', acct, 'held', hold)
if ARGV[6] ~= '' then
  redis.call('HSET', meta, call_id, ARGV[6])
end
return {'OK', credit, live + 1, daily_left}
