--[[ touch: keep an expiring queue (x-expires) alive for another ttl.

KEYS[1..n]  all streams of ONE queue (one per priority level)
KEYS[n+1]   the queue's wake marker (zset)
KEYS[n+2]   the queue's ready index (set)
KEYS[n+3]   the queue's delayed set (zset)
KEYS[n+4]   the queue's delayed messages (hash)
KEYS[n+5]   the queue's big messages (hash)
KEYS[n+6]   the queue's arguments (hash)
KEYS[n+7]   the queue's counters (hash: expired)
KEYS[n+8]   the queue's key store (hash), ks:q:{name}:unique (x-unique-key: it names the
            messages that hold the keys, so it must live as long as they do)
KEYS[n+9]   the queue's staging hash, ks:q:{name}:fair (x-fairness: staged messages)
ARGV[1]     ttl in ms
Reply:      number of keys whose expiry was set (those that exist)
Errors:     "touch: expected ..." for another layout; WRONGTYPE (checked before any write:
            another program's key at one of these names does not get our expiry)
Minimum Redis: 6.2. Cost: O(n). Its consumers call it (the lease keeper) at a third of the
ttl; once they are gone the keys expire. See docs/design.rst (Key layout, Unique keys).
]]
--@include common
local bad = check_args('touch', #KEYS >= 10, #ARGV == 1,
                       'KEYS: streams, marker, index, delayed set, delayed messages, big ' ..
                       'messages, arguments, counters, key store, staging hash; ARGV: ttl')
if bad then return bad end
local n = #KEYS - 9
-- every key is checked first (see wrong_type)
local kinds = {'zset', 'set', 'zset', 'hash', 'hash', 'hash', 'hash', 'hash', 'hash'}  -- marker ...
for i, key in ipairs(KEYS) do
  local wrong = wrong_type(key, i <= n and 'stream' or kinds[i - n])
  if wrong then return redis.error_reply(wrong) end
end
local done = 0
for _, key in ipairs(KEYS) do
  done = done + redis.call('PEXPIRE', key, ARGV[1])
end
return done
