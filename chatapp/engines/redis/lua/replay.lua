-- What a joiner gets: the room's epoch and latest seq, and the messages to replay.
-- KEYS: 1 the room's meta, 2 its history, 3 its deleted lines (hash: seq -> 1), 4 and 5 its
--       refs of this period and the one before
-- ARGV: 1 an epoch for a room that has none, 2 the joiner's epoch ("" without since),
--       3 its seq, 4 how many of the last messages to give when it cannot recover, 5 "all" to
--       give instead everything kept when the epoch is not the joiner's (a worker whose room
--       lost its data: everything in the new epoch is new to its clients), 6 seconds a quiet
--       room's keys live
-- Returns {epoch, seq, recovered (1/0), {id, fields, ...}..., {deleted (1/0) per entry}} with
-- entries oldest first.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0, 'time', 0)
  -- (as in publish.lua: anything left of the room is of a lost epoch; after the HSET)
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
end
redis.call('EXPIRE', KEYS[1], ARGV[6])
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq'))
local since = tonumber(ARGV[3])

local function answer(recovered, entries)
  local deleted = {}
  for i, entry in ipairs(entries) do
    deleted[i] = redis.call('HEXISTS', KEYS[3], string.match(entry[1], '^(%d+)'))
  end
  return {epoch, seq, recovered, entries, deleted}
end

if ARGV[2] == epoch and since <= seq then
  local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
  local first = seq + 1
  if #oldest > 0 then
    first = tonumber(string.match(oldest[1][1], '^(%d+)'))
  end
  if since + 1 >= first then
    return answer(1, redis.call('XRANGE', KEYS[2], (since + 1) .. '-0', '+'))
  end
end
if ARGV[5] == 'all' and ARGV[2] ~= epoch then
  return answer(0, redis.call('XRANGE', KEYS[2], '-', '+'))
end
local newest = {}
if tonumber(ARGV[4]) > 0 then
  newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', ARGV[4])
end
local entries = {}
for i = #newest, 1, -1 do
  entries[#entries + 1] = newest[i]
end
return answer(0, entries)
