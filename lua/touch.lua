--[[ touch: keep an expiring queue (x-expires) alive for another ttl.

KEYS[1..n]  the queue's keys that exist while it lives: its streams, wake marker, ready
            index and delayed keys
ARGV[1]     ttl in ms
Reply:      number of keys whose expiry was set
Errors:     "touch: expected ..." for another layout
Minimum Redis: 6.2. Cost: O(n). Its consumers call it (the lease keeper) at a third of the
ttl; once they are gone the keys expire. See docs/design.rst (Key layout).
]]
--@include common
local bad = check_args('touch', #KEYS >= 1, #ARGV == 1, 'KEYS: the queue\'s keys; ARGV: ttl')
if bad then return bad end
local done = 0
for _, key in ipairs(KEYS) do
  done = done + redis.call('PEXPIRE', key, ARGV[1])
end
return done
