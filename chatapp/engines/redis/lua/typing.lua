-- A member is typing: tell the room's workers on its shard channel, unless the member is muted.
-- KEYS: 1 the member's mute in the room
-- ARGV: 1 the shard channel, 2 the member's key, 3 its nick
-- Returns 1 when passed on, 0 when muted.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('SPUBLISH', ARGV[1], 't\n' .. ARGV[2] .. '\n' .. ARGV[3])
return 1
