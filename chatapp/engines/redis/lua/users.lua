-- Connections per user in the whole chat (token mode), so that one user's limit holds across
-- every worker: each worker says its own count for a user (absolute, so it may say it again
-- after an outage), and the total is the sum.
-- KEYS: 1 totals (hash: user -> connections in all workers), 2 this worker's counts (hash:
--       user -> connections here)
-- ARGV: 1 "set" or "evict" (the worker of KEYS[2] went silent: take its counts out), 2 user,
--       3 connections here now, 4 the most a user may have (checked when the count grows),
--       5 seconds the worker's counts live without a heartbeat
-- Returns 1, or 0 when the count would grow past the limit (nothing changed).
if ARGV[1] == 'evict' then
  local counts = redis.call('HGETALL', KEYS[2])
  for i = 1, #counts, 2 do
    local total = tonumber(redis.call('HGET', KEYS[1], counts[i]) or '0') - tonumber(counts[i + 1])
    if total > 0 then redis.call('HSET', KEYS[1], counts[i], total) else redis.call('HDEL', KEYS[1], counts[i]) end
  end
  redis.call('DEL', KEYS[2])
  return 1
end
local user, here = ARGV[2], tonumber(ARGV[3])
local mine = tonumber(redis.call('HGET', KEYS[2], user) or '0')
local total = tonumber(redis.call('HGET', KEYS[1], user) or '0') - mine + here
if here > mine and total > tonumber(ARGV[4]) then
  return 0
end
if here > 0 then redis.call('HSET', KEYS[2], user, here) else redis.call('HDEL', KEYS[2], user) end
if total > 0 then redis.call('HSET', KEYS[1], user, total) else redis.call('HDEL', KEYS[1], user) end
redis.call('EXPIRE', KEYS[2], ARGV[5])
return 1
