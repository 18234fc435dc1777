-- A worker went silent (killed, its host lost): take its connections out of a room, so its
-- members leave for everyone else (those it held alone announce it).
-- KEYS: 1 owners, 2 totals, 3 sorted, 4 the silent worker's counts, 5 the presence version
--       (as in presence.lua)
-- ARGV: 1 the shard channel, 2 rooms past this many members announce nothing
-- Returns the number of members that left.
local counts = redis.call('HGETALL', KEYS[4])
local gone = 0
for i = 1, #counts, 2 do
  local key, here = counts[i], tonumber(counts[i + 1])
  local total = tonumber(redis.call('HGET', KEYS[2], key) or '0') - here
  if total > 0 then
    redis.call('HSET', KEYS[2], key, total)
  else
    local owner = redis.call('HGET', KEYS[1], key)
    redis.call('HDEL', KEYS[2], key)
    redis.call('HDEL', KEYS[1], key)
    if owner then
      local _, sortkey, nick = string.match(owner, '^(.-)\t(.-)\t(.*)$')
      redis.call('ZREM', KEYS[3], sortkey .. '\t' .. key .. '\t' .. nick)
      local version = redis.call('INCR', KEYS[5])
      if redis.call('ZCARD', KEYS[3]) <= tonumber(ARGV[2]) then
        redis.call('SPUBLISH', ARGV[1], 'p\n' .. version .. '\nleft\n' .. key .. '\n' .. nick)
      end
    end
    gone = gone + 1
  end
end
redis.call('DEL', KEYS[4])
return gone
