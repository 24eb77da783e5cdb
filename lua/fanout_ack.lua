--[[ fanout_ack: acknowledge entries a queue's group read from a fanout stream; trim it.

KEYS[1]   the exchange's fanout stream, ks:x:{ex}:fanout
ARGV[1]   consumer group (the bound queue's name)
ARGV[2..] entry ids
Reply:    number of entries that were pending and are now acked
Errors:   "fanout_ack: expected ..." for another layout; WRONGTYPE
Minimum Redis: 6.2. Cost: O(ids + groups + entries trimmed). Acking twice, after unbinding or
on a missing stream is harmless. See docs/design.rst (Fanout).
]]
--@include common
local bad = check_args('fanout_ack', #KEYS == 1, #ARGV >= 2, 'KEYS: stream; ARGV: group, ids')
if bad then return bad end
local done = 0
for j = 2, #ARGV do done = done + redis.call('XACK', KEYS[1], ARGV[1], ARGV[j]) end
trim_shared(KEYS[1])
return done
