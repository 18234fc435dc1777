-- One line said in a room: its seq, its time and its place in the room's history, atomically.
-- KEYS: 1 the room's meta (hash: epoch, seq, time), 2 its history (stream, ids "<seq>-0"),
--       3 the ref's key (string: the seq it got; ignored without a ref), 4 the speaker's mute
--       in the room
-- ARGV: 1 an epoch for a room that has none (new, or lost with Redis's data), 2 nick ("" for
--       a v1 line), 3 text, 4 lines to keep at least, 5 seconds a quiet room's keys live,
--       6 the room's shard channel, 7 "1" when there is a ref (a client's, or the worker's id
--       for a v1 line, so that a retried publish is no second line), 8 seconds a ref is
--       remembered, 9 the worker that said it, 10 that worker's id for the line, 11 the
--       speaker's user ("" for none)
-- Returns {epoch, seq, 1 when the ref had been published already (nothing new) else 0}, or
-- {"muted", until ("0": no end)}.
if ARGV[11] ~= '' then
  local muted = redis.call('GET', KEYS[4])
  if muted then
    return {'muted', muted}
  end
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0, 'time', 0)
end
if ARGV[7] == '1' then
  local first = redis.call('GET', KEYS[3])
  if first then
    return {epoch, tonumber(first), 1}
  end
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
-- Redis's clock, never running backwards within the room.
local now = redis.call('TIME')
local time = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local last = tonumber(redis.call('HGET', KEYS[1], 'time'))
if time < last then time = last end
redis.call('HSET', KEYS[1], 'time', time)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], seq .. '-0', 't', time, 'n', ARGV[2], 'x', ARGV[3],
  'o', ARGV[9], 'l', ARGV[10], 'u', ARGV[11])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
if ARGV[7] == '1' then
  redis.call('SET', KEYS[3], seq, 'EX', ARGV[8])
end
-- Lines are one line each (no newline in a nick, a user or a text): the text goes last.
redis.call('SPUBLISH', ARGV[6],
  'm\n' .. epoch .. '\n' .. seq .. '\n' .. time .. '\n' .. ARGV[2] .. '\n' .. ARGV[11] .. '\n' .. ARGV[9] .. '\n'
  .. ARGV[10] .. '\n' .. ARGV[3])
return {epoch, seq, 0}
