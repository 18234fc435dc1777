-- Delete a line: it becomes a tombstone (replays give it without its text), and the room's
-- next event says so, to every member.
-- KEYS: 1 the room's meta, 2 its history, 3 its deleted lines (hash: seq -> 1)
-- ARGV: 1 the line's seq, 2 who deletes ("" for the app's backend), 3 "1" when they moderate
--       the room (else only their own line), 4 their nick ("" for none), 5 the shard channel,
--       6 seconds a quiet room's keys live, 7 the worker asking
-- Returns {"ok"}, {"done"} (deleted already), {"missing"} (no such line kept) or {"forbidden"}.
local seq = ARGV[1]
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  return {'missing'}  -- (what is left of a room whose meta is lost is of a lost epoch)
end
local found = redis.call('XRANGE', KEYS[2], seq .. '-0', seq .. '-0')
if #found == 0 then
  return {'missing'}
end
local fields = {}
local entry = found[1][2]
for i = 1, #entry, 2 do fields[entry[i]] = entry[i + 1] end
if fields['g'] then
  return {'missing'}  -- a deletion, not a line
end
-- Its author: the third of e's fields (publish.lua), or the field u of an entry kept before.
local author = fields['u']
if fields['e'] then author = string.match(fields['e'], '^[^\n]*\n[^\n]*\n([^\n]*)') end
if ARGV[3] ~= '1' and (ARGV[2] == '' or author ~= ARGV[2]) then
  return {'forbidden'}
end
if redis.call('HEXISTS', KEYS[3], seq) == 1 then
  return {'done'}
end
redis.call('HSET', KEYS[3], seq, 1)
local next = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local now = redis.call('TIME')
local time = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local last = tonumber(redis.call('HGET', KEYS[1], 'time'))
if time < last then time = last end
redis.call('HSET', KEYS[1], 'time', time)
redis.call('XADD', KEYS[2], next .. '-0', 'o', ARGV[7], 'e', time .. '\n' .. ARGV[4] .. '\n\n\n', 'g', seq)
for i = 1, 3 do
  redis.call('EXPIRE', KEYS[i], ARGV[6])
end
redis.call('SPUBLISH', ARGV[5], 'd\n' .. epoch .. '\n' .. next .. '\n' .. time .. '\n' .. ARGV[4] .. '\n' .. seq)
return {'ok'}
