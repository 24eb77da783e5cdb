--[[ deadletter: set one delivered entry aside in the queue's dead-letter stream.

KEYS[1]   the stream that holds the entry
KEYS[2]   the queue's dead-letter stream, ks:q:{name}:dlq
ARGV[1]   consumer group (the queue's name)
ARGV[2]   entry id
ARGV[3]   reason (free text, e.g. the decoding error)
ARGV[4]   delivery count so far
ARGV[5]   "1" if KEYS[1] is a fanout stream other groups still read (the entry is then only
          acked here, not deleted, and the stream trimmed below what every group is done
          with), else "0"
Reply:    1 if the entry was moved, 0 if it no longer exists (or, on a fanout stream, is not
          pending for this group: acked or set aside already, or the group is gone)
Minimum Redis: 6.2. Cost: O(fields of the entry), plus O(groups) on a fanout stream.

The dead letter keeps every field of the entry (as f:<name>), plus reason, stream, group, id
and deliveries, so it can be inspected and redriven.
]]
--@include common
local found = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if #found > 0 and ARGV[5] == '1' then
  -- A fanout entry outlives this group's copy: once it is no longer pending here, a second
  -- (stale) dead-lettering would file a duplicate letter.
  local pending, err = try('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
  if err then return redis.error_reply(err) end
  if pending == nil or #pending == 0 then return 0 end
end
if #found == 0 then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  return 0
end
local err = dead_letter(KEYS[1], ARGV[1], ARGV[2], found[1][2], KEYS[2], ARGV[3], ARGV[4],
                        ARGV[5] == '1')
if err then return redis.error_reply(err) end
return 1
