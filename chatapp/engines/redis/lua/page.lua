-- A page of a room's kept events: the newest before a seq, the oldest after one, or the newest.
-- KEYS: 1 the room's meta, 2 its history, 3 its deleted lines (hash: seq -> 1)
-- ARGV: 1 "before", "since" or "newest", 2 the seq (before or since), 3 how many at most
-- Returns {epoch ("" for a room that keeps nothing), {entries oldest first}, {deleted (1/0)
-- per entry}, 1 when more are kept beyond the page else 0}.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  return {'', {}, {}, 0}  -- (anything left of a room whose meta is lost is of a lost epoch)
end
local limit = tonumber(ARGV[3])
local entries = {}
local more = 0
if ARGV[1] == 'since' then
  entries = redis.call('XRANGE', KEYS[2], (tonumber(ARGV[2]) + 1) .. '-0', '+', 'COUNT', limit + 1)
  if #entries > limit then
    table.remove(entries)
    more = 1
  end
else
  local top = '+'
  if ARGV[1] == 'before' then
    top = '(' .. ARGV[2] .. '-0'
  end
  local newest = redis.call('XREVRANGE', KEYS[2], top, '-', 'COUNT', limit + 1)
  if #newest > limit then
    table.remove(newest)
    more = 1
  end
  for i = #newest, 1, -1 do
    entries[#entries + 1] = newest[i]
  end
end
local deleted = {}
for i, entry in ipairs(entries) do
  deleted[i] = redis.call('HEXISTS', KEYS[3], string.match(entry[1], '^(%d+)'))
end
return {epoch, entries, deleted, more}
