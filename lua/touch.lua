--[[ touch: keep an expiring queue (x-expires) alive for another ttl.

KEYS[1..n]  the queue's keys that exist while it lives: its streams, wake marker and ready
            index
ARGV[1]     ttl in ms
Reply:      number of keys whose expiry was set
Minimum Redis: 6.2. Cost: O(n).

Consumers of the queue call it (from the lease keeper) at a third of the ttl; when they are
gone the keys expire and the queue with them, as x-expires promises.
]]
local done = 0
for _, key in ipairs(KEYS) do
  done = done + redis.call('PEXPIRE', key, ARGV[1])
end
return done
