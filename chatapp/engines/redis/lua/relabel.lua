-- A room whose Redis went back in time (a failover lost its last writes) numbers lines again
-- from there, so the seqs after that point no longer name what workers delivered: the room
-- goes on under a new epoch, its history kept as it is (its seqs now the new epoch's), and
-- every member gets a fresh joined. Only if it is still in the epoch that went back (several
-- workers may find out at once).
-- KEYS: 1 the room's meta
-- ARGV: 1 the epoch that went back, 2 a new epoch
if redis.call('HGET', KEYS[1], 'epoch') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[2])
end
return 1
