--[[ deadletter: set one delivered entry aside in the queue's dead-letter stream.

KEYS[1]   the stream that holds the entry
KEYS[2]   the queue's dead-letter stream, ks:q:{name}:dlq (for a fanout group on Redis
          Cluster: ks:x:{ex}:dlq:<queue>)
ARGV[1]   consumer group (the queue's name)
ARGV[2]   entry id
ARGV[3]   reason (free text, e.g. the decoding error)
ARGV[4]   delivery count so far
ARGV[5]   "1" if KEYS[1] is a fanout stream (the entry is only acked there, and the stream
          trimmed), else "0"
Reply:    1 if the entry was moved, 0 if it no longer exists (or, on a fanout stream, is not
          pending for this group)
Errors:   "deadletter: expected ..." for another layout; WRONGTYPE
Minimum Redis: 6.2. Cost: O(fields of the entry), plus O(groups) on a fanout stream.
See docs/design.rst (Delivery counts and dead letters).
]]
--@include common
local bad = check_args('deadletter', #KEYS == 2, #ARGV == 5,
                       'KEYS: stream, dead-letter stream; ARGV: group, id, reason, count, shared')
if bad then return bad end
local found = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if #found > 0 and ARGV[5] == '1' then
  -- a fanout entry outlives this group's copy: not pending here, it was filed already
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
