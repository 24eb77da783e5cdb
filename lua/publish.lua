--[[ publish: append one message to a queue's stream and wake its consumers.

KEYS[1]   the stream of the message's priority level, e.g. ks:q:{celery}:0
KEYS[2]   the queue's wake marker (zset), ks:q:{celery}:wake
ARGV[1]   the message: Kombu's JSON envelope, stored as field "m"
Reply:    the new entry id
Minimum Redis: 6.2. Cost: O(1).

The marker is set in the same script as the XADD, so no consumer can see the marker without
the message or the message without the marker: the heart of the no-lost-wake-up argument in
kombu_streams/poller.py. Never trims: a stream only loses entries that were acked.
]]
local id = redis.call('XADD', KEYS[1], '*', 'm', ARGV[1])
redis.call('ZADD', KEYS[2], 0, 'w')
return id
