-- rebase.lua: load an account's balance and today's billed seconds from PostgreSQL (a2bd sync).
--
-- KEYS[1]  a2b:{acct:N}   the account hash (its other fields are written beside this script)
-- ARGV[1]  id of the newest ledger line in PostgreSQL's snapshot (0 when the account has none)
-- ARGV[2]  the account's balance in that snapshot (micro-units)
-- ARGV[3]  today, UTC, YYYYMMDD
-- ARGV[4]  billed seconds of the account's call lines today in that snapshot
--
-- Applied only when Redis is not ahead of the snapshot (its `lid` is not newer): a settle that landed
-- between the snapshot and now already carries every line the snapshot has, and more.
-- Returns 1 when applied, 0 when Redis was ahead.

local lid = tonumber(redis.call('HGET', KEYS[1], 'lid')) or -1
if lid > tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'balance', ARGV[2], 'lid', ARGV[1], 'day', ARGV[3], 'today_s', ARGV[4])
return 1
