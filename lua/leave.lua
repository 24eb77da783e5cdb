--[[ leave: a consumer that goes away removes itself from its groups where it owns nothing.

KEYS[1..n]  the streams of ONE source: a queue's streams (one per priority level), or one
            fanout stream
ARGV[1]     consumer group (the queue's name)
ARGV[2]     the consumer that leaves (a channel's own name; never the holder)
Reply:      number of streams whose group it is not in any more (removed now, or never
            there); the others hold an entry it still owns
Errors:     "leave: expected ..." for another layout; WRONGTYPE (checked before any write)
Minimum Redis: 6.2. Cost: O(n): per stream one XPENDING of the consumer's own entries
(COUNT 1) and at most one XGROUP DELCONSUMER. A consumer that still owns an entry stays
(DELCONSUMER would drop its PEL records and strand those messages): the lease keeper of
some consumer reclaims them, and reclaim.lua forgets it later. Why: every channel reads
under a name of its own, so without this each closed channel would stay in XINFO CONSUMERS
until reclaim forgets it, and what lists consumers grows with restarts. See docs/design.rst
(Leases).
]]
--@include common
local bad = check_args('leave', #KEYS >= 1, #ARGV == 2 and ARGV[2] ~= '',
                       'KEYS: streams; ARGV: group, consumer')
if bad then return bad end
local group, me = ARGV[1], ARGV[2]
local wrong = wrong_streams(1, #KEYS)
if wrong then return redis.error_reply(wrong) end
local left = 0
for _, key in ipairs(KEYS) do
  local owned, err = try('XPENDING', key, group, '-', '+', 1, me)
  if err then return redis.error_reply(err) end
  if owned and #owned == 0 then  -- nil: no stream or no group, nothing to leave
    redis.call('XGROUP', 'DELCONSUMER', key, group, me)  -- answers the entries it owned: 0
    left = left + 1
  end
end
return left
