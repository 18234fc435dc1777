-- Take rooms out of the `rooms` listing once they are quiet: no member, and no member came
-- or went for as long as a quiet room's keys live (those keys have expired by then).
-- KEYS: 1 the listing (zset: room -> minus its member count), 2 activity (zset: room -> when
--       its members last changed, ms)
-- ARGV: 1 rooms whose members last changed before this (ms) are quiet, 2 at most this many
--       rooms are looked at per call
-- Returns the number of rooms taken out of the listing.
local taken = 0
for _, room in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))) do
  if tonumber(redis.call('ZSCORE', KEYS[1], room) or '0') == 0 then
    redis.call('ZREM', KEYS[1], room)
    taken = taken + 1
  end
  redis.call('ZREM', KEYS[2], room)
end
return taken
