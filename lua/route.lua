--[[ route: read an exchange's routing table, first dropping bindings past their deadline.

KEYS[1]   the routing table (set), ks:x:{ex}:bindings
KEYS[2]   the table's deadlines (zset member -> unix ms), ks:x:{ex}:deadlines
ARGV[1]   the most expired bindings to drop in this call
Reply:    the table's members
Minimum Redis: 6.2. Cost: O(members + dropped).
]]
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_ms, 'LIMIT', 0,
                           tonumber(ARGV[1]))
for _, member in ipairs(expired) do
  redis.call('SREM', KEYS[1], member)
  redis.call('ZREM', KEYS[2], member)
end
return redis.call('SMEMBERS', KEYS[1])
