--[[ renew: extend the leases of messages this consumer is still working on.

KEYS[1..n]  streams of ONE queue that hold the messages
ARGV[1]     consumer group (the queue's name)
ARGV[2]     consumer name: only messages this consumer still owns are renewed
ARGV[3..]   pairs: stream index k (1..n), entry id
Reply:      the leases this consumer lost: a flat array of pairs (stream index, entry id)
            for messages that are no longer pending under this consumer (reclaimed by
            another consumer after a stall, or acked or purged meanwhile)
Minimum Redis: 6.2. Cost: O(number of ids).

Renewal resets the PEL idle time (XCLAIM to itself, min idle 0, JUSTID: the delivery count
stays). Ownership is checked first, so a consumer never takes back a message that was
already given to someone else.
]]
local group, me, lost = ARGV[1], ARGV[2], {}
for j = 3, #ARGV, 2 do
  local k, id = ARGV[j], ARGV[j + 1]
  local key = KEYS[tonumber(k)]
  local p = redis.call('XPENDING', key, group, id, id, 1)
  if p[1] and p[1][2] == me then
    redis.call('XCLAIM', key, group, me, 0, id, 'JUSTID')
  else
    lost[#lost + 1] = k
    lost[#lost + 1] = id
  end
end
return lost
