-- Lines said in one room, in order: each gets its seq, its time and its place in the room's
-- history, atomically; then one message on the room's channel carries them all (one script
-- call and one delivery per batch, not per line: bench/README.md, "Through Redis"). A new
-- line costs one command (its XADD; the history is trimmed once a call); the refs of the
-- whole batch are looked up with two HMGETs and remembered with one HSET (and an HLEN while
-- the period's hash is a listpack), and a batch's v1 lines cost one GET and one SET in all.
-- Nothing here takes a line apart: the worker sends what the history keeps and the channel
-- carries as one piece (taking it apart in Lua was a fifth of this script's cost).
-- KEYS: 1 the room's meta (hash: epoch, seq, time), 2 its history (stream, ids "<seq>-0",
--       fields o: the worker that said it, e: "<time>\n" then the line's piece, below), 3 the
--       refs said in this period (hash: a ref's field -> the seq it got), 4 those of the
--       period before, 5 this worker's v1 mark in the room (the number of its last v1 line
--       published there), 6 its deleted lines, then the mute key of each user who speaks in
--       the batch
-- ARGV: 1 an epoch for a room that has none (new, or lost with Redis's data), 2 lines to keep
--       at least, 3 seconds a quiet room's keys live, 4 the room's shard channel, 5 seconds a
--       period's refs (and a v1 mark) live, 6 the worker that said them, 7 "1" to push the
--       room's expiry back (a worker does once in a while: three EXPIREs were a sixth of this
--       script's cost; a new room's keys, and a period's refs, get theirs anyway), 8 how many
--       sessions follow the lines (below), then three per line: the index of its user's mute
--       key among the mute keys ("0": no user); its ref: "" for none, a client's field (refs.py:
--       "s", 12 characters of its session's digest, the ref), or for a v1 line its number,
--       counted by the worker from 1 up (so that a retried publish is no second line: a
--       worker's v1 lines reach a room in the order of their numbers); and its piece,
--       "<nick>\n<user>\n<worker's id for it>\n<text>" (nick "" for a v1 line, user "" for
--       none; no newline in any of them); then, while workers of the earlier layout may be
--       about, two per session of the batch: its fields' first 13 characters and the session
--       (its refs are then also looked up and remembered as "<session>\0<ref>")
-- Returns {epoch, then per line: its seq; minus the seq when the ref had been published
-- already (nothing new; 0 for a v1 line); or "muted <until>" ("0": no end)}.
local sessions = tonumber(ARGV[8])
local lines = (#ARGV - 8 - 2 * sessions) / 3
local earlier = {}  -- a field's first 13 characters -> its session (the earlier layout's)
for i = #ARGV - 2 * sessions + 1, #ARGV, 2 do earlier[ARGV[i]] = ARGV[i + 1] end
local refresh = ARGV[7] == '1'
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'seq', 'time')
local epoch, seq, last = meta[1], tonumber(meta[2]), tonumber(meta[3])
if not epoch then
  epoch, seq, last, refresh = ARGV[1], 0, 0, true
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0, 'time', 0)
  -- A new room, or one whose meta Redis lost (with all its data, or alone: evicted under
  -- maxmemory): what is left of its history, tombstones and refs is of a lost epoch. (After
  -- the HSET: a script's first write is the one a full Redis refuses, and DEL never is.)
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[6])
end
local now = redis.call('TIME')
local time = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if time < last then time = last end
-- (Lua's numbers are doubles: each turned into a string is a printf, so each is turned once)
local time_s = tostring(time)

local S = string.byte('s')  -- (a client's ref's field starts with it; a v1 line's is digits)
local refs = {}
local v1_mark, v1_last = nil, nil
for i = 10, 7 + 3 * lines, 3 do
  local ref = ARGV[i]
  if ref ~= '' then
    if string.byte(ref) ~= S then
      v1_mark = v1_mark or tonumber(redis.call('GET', KEYS[5]) or '0')
    else
      refs[#refs + 1] = ref
    end
  end
end
-- The fields asked for: every ref's, then (while there are sessions) its field in the earlier
-- layout (older: ref -> that field, remembered beside it too).
local asked, older = refs, {}
if sessions > 0 then
  asked = {}
  for j, ref in ipairs(refs) do
    older[ref] = earlier[string.sub(ref, 1, 13)] .. '\0' .. string.sub(ref, 14)
    asked[j], asked[#refs + j] = ref, older[ref]
  end
end
-- ref -> the seq it got, in either period (the later one first), in either layout. A period's
-- hash holds a field "." (no ref's is) from its first write on: without it, it is new.
-- Past COMPACT_REFS fields "." gets a value longer than hash-max-listpack-value (64 by
-- default), which makes the hash a hashtable: as a listpack (to 512 fields by default) each
-- ref looked up or remembered is a scan of the period's every ref, a third of this script's
-- cost at 400 refs (bench/README.md, "At cfc9c69"); a quiet room's refs stay a listpack, at
-- half the memory.
local COMPACT_REFS, HASHTABLE_MARK = 128, string.rep('.', 65)
local known, new_period, compact = {}, false, false
if #refs > 0 then
  local seqs = redis.call('HMGET', KEYS[4], unpack(asked))
  for j, ref in ipairs(refs) do
    local seq = seqs[j] or seqs[#refs + j]
    if seq then known[ref] = seq end
  end
  seqs = redis.call('HMGET', KEYS[3], '.', unpack(asked))
  new_period = not seqs[1]
  compact = new_period or #seqs[1] < #HASHTABLE_MARK
  for j, ref in ipairs(refs) do
    local seq = seqs[j + 1] or seqs[#refs + j + 1]
    if seq then known[ref] = seq end
  end
end

local results, heard, remembered, mutes = {epoch}, {}, {}, {}
for i = 1, lines do
  local at = 6 + 3 * i
  local mute, ref = ARGV[at], ARGV[at + 1]
  local muted = false
  if mute ~= '0' then
    muted = mutes[mute]
    if muted == nil then
      muted = redis.call('GET', KEYS[6 + tonumber(mute)])
      mutes[mute] = muted
    end
  end
  local v1 = v1_mark and string.byte(ref) ~= S and tonumber(ref)
  if muted then
    results[i + 1] = 'muted ' .. muted
  elseif v1 and v1 <= v1_mark then
    results[i + 1] = 0
  elseif ref ~= '' and known[ref] then
    results[i + 1] = -tonumber(known[ref])
  else
    seq = seq + 1
    local seq_s = tostring(seq)
    local entry = time_s .. '\n' .. ARGV[at + 2]
    redis.call('XADD', KEYS[2], seq_s, 'o', ARGV[6], 'e', entry)
    results[i + 1] = seq
    if v1 then
      v1_last = ref
    elseif ref ~= '' then
      known[ref] = seq_s
      remembered[#remembered + 1] = ref
      remembered[#remembered + 1] = seq_s
      if sessions > 0 then
        remembered[#remembered + 1] = older[ref]
        remembered[#remembered + 1] = seq_s
      end
    end
    heard[#heard + 1] = seq_s  -- (two parts a line: the message joins them as it joins lines)
    heard[#heard + 1] = entry
  end
end
if #remembered > 0 then
  if new_period then
    remembered[#remembered + 1] = '.'
    remembered[#remembered + 1] = '1'
  end
  redis.call('HSET', KEYS[3], unpack(remembered))
  if new_period then redis.call('EXPIRE', KEYS[3], ARGV[5]) end
  if compact and redis.call('HLEN', KEYS[3]) > COMPACT_REFS then
    redis.call('HSET', KEYS[3], '.', HASHTABLE_MARK)
  end
end
if v1_last then redis.call('SET', KEYS[5], v1_last, 'EX', ARGV[5]) end
if refresh then  -- (a new room's meta too, even when nothing of the batch was kept)
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  if #heard > 0 then redis.call('EXPIRE', KEYS[2], ARGV[3]) end
end
if #heard > 0 then
  redis.call('XTRIM', KEYS[2], 'MAXLEN', '~', ARGV[2])
  redis.call('HSET', KEYS[1], 'seq', tostring(seq), 'time', time_s)
  redis.call('SPUBLISH', ARGV[4], 'm\n' .. epoch .. '\n' .. ARGV[6] .. '\n' .. #heard / 2 .. '\n' .. table.concat(heard, '\n'))
end
return results
