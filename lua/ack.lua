--[[ ack: acknowledge delivered messages and delete them, so acked work takes no memory.

KEYS[1..n]  streams of ONE queue (one hash slot) that hold the messages
ARGV[1]     consumer group (the queue's name)
ARGV[2..]   pairs: stream index k (1..n), entry id
Reply:      number of entries that were pending and are now acked
Minimum Redis: 6.2. Cost: O(number of ids).

An id that is no longer pending (acked already, or the queue was purged or deleted) is
skipped: acking twice is harmless. The entry is deleted only when this ack removed it from
the PEL, so an entry that was never delivered is never deleted by a stray ack.
]]
local group, done = ARGV[1], 0
for j = 2, #ARGV, 2 do
  local key, id = KEYS[tonumber(ARGV[j])], ARGV[j + 1]
  if redis.call('XACK', key, group, id) == 1 then
    redis.call('XDEL', key, id)
    done = done + 1
  end
end
return done
