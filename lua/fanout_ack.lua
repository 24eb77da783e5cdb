--[[ fanout_ack: acknowledge messages a queue's group read from a fanout stream, then trim the
stream below what every bound queue is done with.

KEYS[1]   the exchange's fanout stream, ks:x:{ex}:fanout
ARGV[1]   consumer group (the bound queue's name)
ARGV[2..] entry ids
Reply:    number of entries that were pending and are now acked
Minimum Redis: 6.2. Cost: O(ids + groups + entries trimmed).

An entry is deleted only once no group still has it unread or unacked, so a queue whose
consumer is offline keeps its broadcasts until it comes back (or its binding expires).
Acking twice, after the binding (group) was removed, or on a missing stream is harmless.
]]
--@include common
local done = 0
for j = 2, #ARGV do done = done + redis.call('XACK', KEYS[1], ARGV[1], ARGV[j]) end
trim_shared(KEYS[1])
return done
