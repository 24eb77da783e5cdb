--[[ publish: append one message to a queue's stream and wake its consumers.

KEYS[1]   the stream of the message's priority level, e.g. ks:q:{celery}:3
KEYS[2]   the queue's wake marker (zset), ks:q:{celery}:wake
KEYS[3]   the queue's first stream (level 0), ks:q:{celery}:0: while it exists, the queue does
KEYS[4]   the queue's ready index (set), ks:q:{celery}:ready (see lua/lib/common.lua)
ARGV[1]   the message: Kombu's JSON envelope, stored as field "m"
ARGV[2]   "1" when routed through an exchange: publish only if the queue exists (a bound
          queue was declared; if its keys are gone it was deleted or expired, and a copy
          must not bring it back); "0" for the default exchange, which creates the queue
Reply:    the new entry id, or nil when the queue does not exist and ARGV[2] is "1"
Minimum Redis: 6.2 (XADD NOMKSTREAM). Cost: O(1): XADD, ZADD and SADD, plus EXISTS only when
the level's stream does not exist yet, and PTTL only when the marker or the stream's index
member was not there (both then get the queue's expiry; present ones have it already: every
script that sets them gives it, and touch.lua refreshes it with the streams; a marker the
poller put back with a plain ZADD gets it at its consumer's next read or touch).

A queue exists while its level's stream or its first stream does (declare makes all its
streams, delete removes them all, x-expires expires them together), so a routed copy first
tries XADD NOMKSTREAM and looks at the first stream only when that found no stream.

The marker is set in the same script as the XADD, so no consumer can see the marker without
the message or the message without the marker: the heart of the no-lost-wake-up argument in
kombu_streams/poller.py. Never trims: a stream only loses entries that were acked.
]]
--@include common
local id = false
if ARGV[2] == '1' then
  id = redis.call('XADD', KEYS[1], 'NOMKSTREAM', '*', 'm', ARGV[1])
  if not id and redis.call('EXISTS', KEYS[3]) == 0 then return false end
end
if not id then id = redis.call('XADD', KEYS[1], '*', 'm', ARGV[1]) end
local new_marker = redis.call('ZADD', KEYS[2], 0, 'w') == 1
local new_member = redis.call('SADD', KEYS[4], KEYS[1]) == 1
if new_marker or new_member then
  local ttl = redis.call('PTTL', KEYS[3])
  if ttl > 0 then
    if new_marker then redis.call('PEXPIRE', KEYS[2], ttl) end
    if new_member then redis.call('PEXPIRE', KEYS[4], ttl) end
  end
end
return id
