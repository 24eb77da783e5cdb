--[[ bind: add, refresh or remove a binding in an exchange's routing table.

KEYS[1]   the routing table (set of "routing key<sep>pattern<sep>queue"), ks:x:{ex}:bindings
KEYS[2]   the table's deadlines (zset member -> unix ms), ks:x:{ex}:deadlines
ARGV[1]   the binding member
ARGV[2]   ttl in ms for a binding of an expiring queue (x-expires), refreshed by its
          consumers; 0 for a permanent binding; -1 removes the binding
Reply:    1 if the table changed (member added or removed), else 0
Minimum Redis: 6.2. Cost: O(1).

Bindings of expiring queues get a deadline; route.lua drops those that passed it, so a queue
whose consumers are gone stops receiving copies (and stops pinning memory).
]]
local ttl = tonumber(ARGV[2])
if ttl < 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return redis.call('SREM', KEYS[1], ARGV[1])
end
local added = redis.call('SADD', KEYS[1], ARGV[1])
if ttl > 0 then
  local now = redis.call('TIME')
  local deadline = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + ttl
  redis.call('ZADD', KEYS[2], deadline, ARGV[1])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
end
return added
