-- provider_settle.lua: apply to a provider's hot state the call lines it carried (as settle.lua does for
-- an account; a provider's key is in another slot than the account's, so it is a script of its own).
--
-- KEYS[1]  a2b:prov:NAME   balance, lid, day, today_s
-- ARGV[1]  id of the newest ledger line of this provider among those settled now
-- ARGV[2]  the provider's balance after it (micro-units: what we owe the carrier)
-- ARGV[3]  today, UTC, YYYYMMDD
-- ARGV[4]  billed seconds of the lines written now (lines written by an earlier batch count 0)
-- ARGV[5]  "1" to load (a2bd sync: ARGV[4] is the whole day's count), "0" to add
--
-- Returns 1 when the balance moved, 0 when Redis already had a newer line (or the provider is unknown).

local key = KEYS[1]
if redis.call('EXISTS', key) == 0 then
  return 0
end
local lid = tonumber(redis.call('HGET', key, 'lid')) or -1
if ARGV[5] == '1' then
  if lid > tonumber(ARGV[1]) then
    return 0
  end
  redis.call('HSET', key, 'balance', ARGV[2], 'lid', ARGV[1], 'day', ARGV[3], 'today_s', ARGV[4])
  return 1
end
local seconds = tonumber(ARGV[4])
if seconds > 0 then
  if redis.call('HGET', key, 'day') == ARGV[3] then
    redis.call('HINCRBY', key, 'today_s', seconds)
  else
    redis.call('HSET', key, 'day', ARGV[3], 'today_s', seconds)
  end
end
if tonumber(ARGV[1]) > lid then
  redis.call('HSET', key, 'balance', ARGV[2], 'lid', ARGV[1])
  return 1
end
return 0
