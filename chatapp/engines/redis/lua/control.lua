-- A removal every worker is to carry out (a kick or ban, "k\n..."; the app's backend's
-- disconnect, "x\n..."): kept a while in the control log, so that a worker whose subscription
-- was cut when it was said reads it back, and said on the control channel with its id there.
-- KEYS: 1 the control log (stream)
-- ARGV: 1 the control channel, 2 the removal, 3 entries the log keeps at least, 4 seconds it
--       lives after the last one
-- Returns the removal's id in the log.
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'c', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('SPUBLISH', ARGV[1], string.sub(ARGV[2], 1, 1) .. '\n' .. id .. string.sub(ARGV[2], 2))
return id
