--[[ fanout_publish: append one message to a fanout stream and wake every bound queue.

KEYS[1]     the exchange's fanout stream, ks:x:{ex}:fanout
KEYS[2]     the exchange's binding deadlines (zset member -> unix ms), ks:x:{ex}:deadlines
KEYS[3..]   the wake marker of each bound queue, ks:x:{ex}:wake:<queue>
ARGV[1]     the message (Kombu's JSON envelope), stored as field "m"
ARGV[2..]   the binding member of each bound queue, in the order of the markers
Reply:      the new entry id, or nil when no group reads the stream (nothing written)
Errors:     "fanout_publish: expected ..." for another layout; WRONGTYPE (checked before any
            write)
Minimum Redis: 6.2. Cost: O(bound queues). The marker of a binding with a deadline
(x-expires) expires at that deadline. See docs/design.rst (Fanout).
]]
--@include common
local bad = check_args('fanout_publish', #KEYS >= 2, #ARGV == #KEYS - 1,
                       'KEYS: stream, deadlines, markers; ARGV: message, one member per marker')
if bad then return bad end
-- every key is checked first (see wrong_type): an entry appended before a marker failed
-- would be appended again by the publisher's retry
local wrong = wrong_type(KEYS[1], 'stream') or wrong_type(KEYS[2], 'zset')
for j = 3, #KEYS do wrong = wrong or wrong_type(KEYS[j], 'zset') end
if wrong then return redis.error_reply(wrong) end
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
