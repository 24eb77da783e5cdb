--[[ fanout_ack: acknowledge entries a queue's group read from a fanout stream; trim it.

KEYS[1]   the exchange's fanout stream, ks:x:{ex}:fanout
ARGV[1]   consumer group (the bound queue's name)
ARGV[2]   consumer name: only entries it still owns are acked (see ack.lua); '' acks whoever
          owns them (operators)
ARGV[3..] entry ids
Reply:    {acked, not owned}: entries that were pending and are now acked; entries (each
          counted once) this consumer no longer owns, left alone (0 for '')
Errors:   "fanout_ack: expected ..." for another layout; WRONGTYPE
Minimum Redis: 6.2. Cost: O(ids + groups + entries trimmed), in one XACK per 1,000 ids and
one trim per call; for a consumer, one XPENDING of its own entries from the lowest to the
highest id (paged).
Acking twice, after unbinding or on a missing stream is harmless. See docs/design.rst
(Fanout, Leases).
]]
--@include common
local bad = check_args('fanout_ack', #KEYS == 1, #ARGV >= 3,
                       'KEYS: stream; ARGV: group, consumer, ids')
if bad then return bad end
local ids = {}
for j = 3, #ARGV do ids[#ids + 1] = ARGV[j] end
local owned, stale, err = owned_ids(KEYS[1], ARGV[1], ARGV[2], ids)
if err then return redis.error_reply(err) end
local done = 0
for first = 1, #owned, 1000 do  -- unpack() has a limit
  done = done + redis.call('XACK', KEYS[1], ARGV[1],
                           unpack(owned, first, math.min(first + 999, #owned)))
end
trim_shared(KEYS[1])
return {done, stale}
