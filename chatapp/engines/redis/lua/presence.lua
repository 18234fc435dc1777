-- Set how many connections one worker has for one member in a room, and keep the room's
-- member list for the whole chat: a member joins when its first connection anywhere comes and
-- leaves when its last one goes. Absolute counts per worker, so a worker may say it again
-- after an outage (or after Redis lost its data) without counting anyone twice. A member is
-- its key: the casefolded nick in open mode (where a nick belongs to one session), the user
-- in token mode.
-- KEYS: 1 owners (hash: key -> session TAB sort key TAB nick), 2 totals (hash: key ->
--       connections in all workers), 3 sorted (zset, score 0: "sort key TAB key TAB nick"),
--       4 this worker's counts (hash: key -> connections here), 5 the room's presence version
--       (a counter: each joined or left gets the next one), 6 the member's ban in the room
-- ARGV: 1 key, 2 nick, 3 session, 4 connections here now, 5 the shard channel, 6 rooms past
--       this many members announce nothing, 7 members to list at most, 8 seconds a quiet
--       room's keys live, 9 the sort key (the casefolded nick), 10 "1" when a nick belongs to
--       one session (open mode)
-- Returns {"taken", nick} if another session holds the nick, {"banned", until ("0": no end)}
-- if the member is banned and joins, else {"ok", nick as the room knows it, member count,
-- {"key TAB nick" of the first members...}, the presence version they are as of}.
local key, nick, session, here = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local mine = tonumber(redis.call('HGET', KEYS[4], key) or '0')
if here > mine then
  local ban = redis.call('GET', KEYS[6])
  if ban then
    return {'banned', ban}
  end
end
local sortkey = ARGV[9]
local owner = redis.call('HGET', KEYS[1], key)
if owner then
  local owner_session, owner_sortkey, owner_nick = string.match(owner, '^(.-)\t(.-)\t(.*)$')
  if owner_session ~= session and ARGV[10] == '1' then
    local others = tonumber(redis.call('HGET', KEYS[2], key) or '0') - mine
    if others > 0 then
      return {'taken', owner_nick}
    end
    owner = nil  -- only this worker held it, under another session: it is this session's now
  else
    nick, sortkey = owner_nick, owner_sortkey
  end
end
local before = tonumber(redis.call('HGET', KEYS[2], key) or '0')
local total = before - mine + here
if here > 0 then
  redis.call('HSET', KEYS[4], key, here)
else
  redis.call('HDEL', KEYS[4], key)
end
local entry = sortkey .. '\t' .. key .. '\t' .. nick
if total > 0 then
  redis.call('HSET', KEYS[2], key, total)
  if not owner then
    redis.call('HSET', KEYS[1], key, session .. '\t' .. sortkey .. '\t' .. nick)
    redis.call('ZADD', KEYS[3], 0, entry)
  end
else
  redis.call('HDEL', KEYS[2], key)
  redis.call('HDEL', KEYS[1], key)
  redis.call('ZREM', KEYS[3], entry)
end
local count = redis.call('ZCARD', KEYS[3])
local version = tonumber(redis.call('GET', KEYS[5]) or '0')
local change = nil
if before == 0 and total > 0 then change = 'joined' elseif before > 0 and total == 0 then change = 'left' end
if change then
  version = redis.call('INCR', KEYS[5])
  if count <= tonumber(ARGV[6]) then
    redis.call('SPUBLISH', ARGV[5], 'p\n' .. version .. '\n' .. change .. '\n' .. key .. '\n' .. nick)
  end
end
for i = 1, 5 do
  redis.call('EXPIRE', KEYS[i], ARGV[8])
end
local listed = {}
for i, member in ipairs(redis.call('ZRANGE', KEYS[3], 0, tonumber(ARGV[7]) - 1)) do
  listed[i] = string.match(member, '^.-\t(.*)$')
end
return {'ok', nick, count, listed, version}
