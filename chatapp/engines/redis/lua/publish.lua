-- Lines said in one room, in order: each gets its seq, its time and its place in the room's
-- history, atomically; then one message on the room's channel carries them all (one script
-- call and one delivery per batch, not per line: bench/README.md, "Through Redis").
-- KEYS: 1 the room's meta (hash: epoch, seq, time), 2 its history (stream, ids "<seq>-0"),
--       then per line: the ref's key (string: the seq it got; ignored without a ref) and the
--       speaker's mute in the room
-- ARGV: 1 an epoch for a room that has none (new, or lost with Redis's data), 2 lines to keep
--       at least, 3 seconds a quiet room's keys live, 4 the room's shard channel, 5 seconds a
--       ref is remembered, 6 the worker that said them, then per line: nick ("" for a v1
--       line), text, "1" when there is a ref (a client's, or the worker's id for a v1 line, so
--       that a retried publish is no second line), the worker's id for the line, the speaker's
--       user ("" for none)
-- Returns per line {epoch, seq, 1 when the ref had been published already (nothing new) else
-- 0}, or {"muted", until ("0": no end)}.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0, 'time', 0)
end
local now = redis.call('TIME')
local time = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local last = tonumber(redis.call('HGET', KEYS[1], 'time'))
if time < last then time = last end
local results, heard = {}, {}
local lines = (#ARGV - 6) / 5
for i = 1, lines do
  local ref_key, mute_key = KEYS[1 + 2 * i], KEYS[2 + 2 * i]
  local a = 6 + 5 * (i - 1)
  local nick, text, has_ref, tag, user = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
  local muted = user ~= '' and redis.call('GET', mute_key)
  local first = has_ref == '1' and redis.call('GET', ref_key)
  if muted then
    results[i] = {'muted', muted}
  elseif first then
    results[i] = {epoch, tonumber(first), 1}
  else
    local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], seq .. '-0', 't', time, 'n', nick, 'x', text,
      'o', ARGV[6], 'l', tag, 'u', user)
    if has_ref == '1' then
      redis.call('SET', ref_key, seq, 'EX', ARGV[5])
    end
    results[i] = {epoch, seq, 0}
    -- Lines are one line each (no newline in a nick, a user or a text): the text goes last.
    heard[#heard + 1] = seq .. '\n' .. time .. '\n' .. nick .. '\n' .. user .. '\n' .. tag .. '\n' .. text
  end
end
if #heard > 0 then
  redis.call('HSET', KEYS[1], 'time', time)
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  redis.call('SPUBLISH', ARGV[4], 'm\n' .. epoch .. '\n' .. ARGV[6] .. '\n' .. #heard .. '\n' .. table.concat(heard, '\n'))
end
return results
