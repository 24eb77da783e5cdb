--[[ deadletter: set one delivered entry aside in the queue's dead-letter stream.

KEYS[1]   the stream that holds the entry
KEYS[2]   the queue's dead-letter stream, ks:q:{name}:dlq
ARGV[1]   consumer group (the queue's name)
ARGV[2]   entry id
ARGV[3]   reason (free text, e.g. the decoding error)
ARGV[4]   delivery count so far
ARGV[5]   "1" if KEYS[1] is a fanout stream other groups still read (the entry is then only
          acked here, not deleted), else "0"
Reply:    1 if the entry was moved, 0 if it no longer exists
Minimum Redis: 6.2. Cost: O(fields of the entry).

The dead letter keeps every field of the entry (as f:<name>), plus reason, stream, group, id
and deliveries, so it can be inspected and redriven.
]]
--@include common
local found = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if #found == 0 then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  return 0
end
dead_letter(KEYS[1], ARGV[1], ARGV[2], found[1][2], KEYS[2], ARGV[3], ARGV[4], ARGV[5] == '1')
return 1
