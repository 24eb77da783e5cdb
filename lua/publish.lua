--[[ publish: append one message to a queue's stream and wake its consumers.

KEYS[1]   the stream of the message's priority level, e.g. ks:q:{celery}:3
KEYS[2]   the queue's wake marker (zset), ks:q:{celery}:wake
KEYS[3]   the queue's first stream (level 0), ks:q:{celery}:0: while it exists, the queue does
ARGV[1]   the message: Kombu's JSON envelope, stored as field "m"
ARGV[2]   "1" when routed through an exchange: publish only if the queue exists (a bound
          queue was declared; if its keys are gone it was deleted or expired, and a copy
          must not bring it back); "0" for the default exchange, which creates the queue
Reply:    the new entry id, or nil when the queue does not exist and ARGV[2] is "1"
Minimum Redis: 6.2. Cost: O(1).

The marker is set in the same script as the XADD, so no consumer can see the marker without
the message or the message without the marker: the heart of the no-lost-wake-up argument in
kombu_streams/poller.py. Never trims: a stream only loses entries that were acked.
]]
--@include common
if ARGV[2] == '1' and redis.call('EXISTS', KEYS[3]) == 0 then return false end
local id = redis.call('XADD', KEYS[1], '*', 'm', ARGV[1])
arm(KEYS[2], KEYS[3])
return id
