--[[ fanout_publish: append one message to a fanout exchange's stream and wake every bound
queue's consumers. Each bound queue reads the stream through its own consumer group.

KEYS[1]     the exchange's fanout stream, ks:x:{ex}:fanout
KEYS[2]     the exchange's binding deadlines (zset member -> unix ms), ks:x:{ex}:deadlines
KEYS[3..]   the wake marker of each bound queue, ks:x:{ex}:wake:<queue>
ARGV[1]     the message (Kombu's JSON envelope), stored as field "m"
ARGV[2..]   the binding member of each bound queue, in the order of the markers
Reply:      the new entry id, or nil when no queue is bound (no group reads the stream)
Minimum Redis: 6.2. Cost: O(bound queues).

Markers of queues bound with a deadline (x-expires) expire at that deadline, so a queue that
went away leaves no marker behind. The stream is trimmed by fanout_ack.lua, only below what
every group has read and acked.
]]
if redis.call('EXISTS', KEYS[1]) == 0 or
    #redis.call('XINFO', 'GROUPS', KEYS[1]) == 0 then
  return false
end
local id = redis.call('XADD', KEYS[1], '*', 'm', ARGV[1])
for j = 3, #KEYS do
  redis.call('ZADD', KEYS[j], 0, 'w')
  local deadline = redis.call('ZSCORE', KEYS[2], ARGV[j - 1])
  if deadline then redis.call('PEXPIREAT', KEYS[j], math.floor(tonumber(deadline))) end
end
return id
