--[[ bind: add, refresh or remove a binding in an exchange's routing table.

KEYS[1]   the routing table (set of "routing key<sep>pattern<sep>queue"), ks:x:{ex}:bindings
KEYS[2]   the table's deadlines (zset member -> unix ms), ks:x:{ex}:deadlines
KEYS[3]   fanout exchanges only: the exchange's stream, ks:x:{ex}:fanout
ARGV[1]   the binding member
ARGV[2]   ttl in ms for a binding of an expiring queue (x-expires), refreshed by its
          consumers; 0 for a permanent binding; -1 removes the binding
ARGV[3]   with KEYS[3] only: the queue's consumer group on the stream
Reply:    1 if the table changed (member added or removed), else 0
Errors:   "bind: expected ..." for another layout; WRONGTYPE (checked before any write)
Minimum Redis: 6.2. Cost: O(1), plus O(groups) to trim a fanout stream on removal.
A fanout binding creates the queue's group at "$"; removing it destroys the group and trims
the stream. See docs/design.rst (Fanout).
]]
--@include common
local bad = check_args('bind', #KEYS == 2 or #KEYS == 3, #ARGV == #KEYS,
                       'KEYS: table, deadlines[, fanout stream]; ARGV: member, ttl[, group]')
if bad then return bad end
local ttl = tonumber(ARGV[2])
local fanout, group = KEYS[3], ARGV[3]
-- all keys checked before the first write (see wrong_type): no half-made binding
local wrong = wrong_type(KEYS[1], 'set') or wrong_type(KEYS[2], 'zset')
if fanout then wrong = wrong or wrong_type(fanout, 'stream') end
if wrong then return redis.error_reply(wrong) end
if ttl < 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  local removed = redis.call('SREM', KEYS[1], ARGV[1])
  if fanout and redis.call('EXISTS', fanout) == 1 then
    redis.pcall('XGROUP', 'DESTROY', fanout, group)
    trim_shared(fanout)
  end
  return removed
end
local added = redis.call('SADD', KEYS[1], ARGV[1])
if ttl > 0 then
  redis.call('ZADD', KEYS[2], now_ms() + ttl, ARGV[1])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
end
if fanout then
  local err = pcall_error(redis.pcall('XGROUP', 'CREATE', fanout, group, '$', 'MKSTREAM'))
  if err and not string.find(err, 'BUSYGROUP', 1, true) then return redis.error_reply(err) end
end
return added
