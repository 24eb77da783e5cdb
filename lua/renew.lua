--[[ renew: extend the leases of messages this consumer is still working on.

KEYS[1..n]  streams of ONE queue that hold the messages
ARGV[1]     consumer group (the queue's name)
ARGV[2]     consumer name: only messages this consumer still owns are renewed
ARGV[3..]   pairs: stream index k (1..n), entry id
Reply:      the leases this consumer lost: a flat array of pairs (stream index, entry id)
            for messages that are no longer pending under this consumer (reclaimed by
            another consumer after a stall, or acked meanwhile), whose entry was deleted,
            or whose stream or group is gone (the queue was deleted)
Errors:     Redis's own (WRONGTYPE when one of our names holds another type).
Minimum Redis: 6.2. Cost: O(number of ids).

Renewal resets the PEL idle time (XCLAIM to itself, min idle 0, JUSTID: the delivery count
stays). Ownership is checked first, so a consumer never takes back a message that was
already given to someone else. A deleted entry is reported lost and not claimed (Redis 7
would drop its PEL record on XCLAIM, Redis 6.2 would renew it), so every version answers
the same; its PEL record goes when it is acked.
]]
--@include common
local group, me, lost = ARGV[1], ARGV[2], {}
for j = 3, #ARGV, 2 do
  local k, id = ARGV[j], ARGV[j + 1]
  local key = KEYS[tonumber(k)]
  local p, err = try('XPENDING', key, group, id, id, 1)
  if err then return redis.error_reply(err) end
  if p and p[1] and p[1][2] == me and #redis.call('XRANGE', key, id, id) > 0 then
    redis.call('XCLAIM', key, group, me, 0, id, 'JUSTID')
  else
    lost[#lost + 1] = k
    lost[#lost + 1] = id
  end
end
return lost
