--[[ route: read an exchange's routing table, first dropping bindings past their deadline.

KEYS[1]   the routing table (set), ks:x:{ex}:bindings
KEYS[2]   the table's deadlines (zset member -> unix ms), ks:x:{ex}:deadlines
KEYS[3]   fanout exchanges only: the exchange's stream, ks:x:{ex}:fanout
ARGV[1]   the most expired bindings to drop in this call
ARGV[2]   fanout exchanges only: the separator in binding members (the queue, which names
          the group, is what follows the last separator)
Reply:    the table's members
Minimum Redis: 6.2. Cost: O(members + dropped), plus O(groups) to trim a fanout stream.

Dropping the binding of an expired fanout queue also destroys its group, so the stream is
no longer held back for a queue nobody reads.
]]
--@include common
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_ms, 'LIMIT', 0,
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
