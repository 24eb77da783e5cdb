--[[ route: read an exchange's routing table, first dropping bindings past their deadline.

KEYS[1]   the routing table (set), ks:x:{ex}:bindings
KEYS[2]   the table's deadlines (zset member -> unix ms), ks:x:{ex}:deadlines
KEYS[3]   fanout exchanges only: the exchange's stream, ks:x:{ex}:fanout
ARGV[1]   the most expired bindings to drop in this call
ARGV[2]   with KEYS[3] only: the separator in binding members (the queue, which names the
          group, is what follows the last separator)
Reply:    the table's members
Errors:   "route: expected ..." for another layout; WRONGTYPE
Minimum Redis: 6.2. Cost: O(members + dropped), plus O(groups) to trim a fanout stream.
An expired fanout binding takes its group with it. See docs/design.rst (Fanout).
]]
--@include common
local bad = check_args('route', #KEYS == 2 or #KEYS == 3, #ARGV == #KEYS - 1,
                       'KEYS: table, deadlines[, fanout stream]; ARGV: count[, separator]')
if bad then return bad end
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_ms(), 'LIMIT', 0,
                           tonumber(ARGV[1]))
local fanout, sep = KEYS[3], ARGV[2]
for _, member in ipairs(expired) do
  redis.call('SREM', KEYS[1], member)
  redis.call('ZREM', KEYS[2], member)
  if fanout and redis.call('EXISTS', fanout) == 1 then
    local queue, from = member, 1
    while true do
      local at = string.find(member, sep, from, true)
      if not at then break end
      queue = string.sub(member, at + #sep)
      from = at + 1
    end
    redis.pcall('XGROUP', 'DESTROY', fanout, queue)
  end
end
if fanout and #expired > 0 and redis.call('EXISTS', fanout) == 1 then trim_shared(fanout) end
return redis.call('SMEMBERS', KEYS[1])
