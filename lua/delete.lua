--[[ delete: delete a queue with all its messages, ready, delayed or in flight.

KEYS[1..n]  all streams of ONE queue (one per priority level)
KEYS[n+1]   the queue's wake marker
KEYS[n+2]   the queue's ready index
KEYS[n+3]   the queue's delayed set
KEYS[n+4]   the queue's delayed messages
KEYS[n+5]   the queue's arguments (hash)
KEYS[n+6]   the queue's counters (hash: expired)
KEYS[n+7]   the queue's id store (zset, x-deduplication-window)
KEYS[n+8]   the queue's key store (hash, x-unique-key)
KEYS[n+9]   the queue's staging hash (x-fairness: messages staged per group)
KEYS[n+10]  the queue's big messages (hash): kept, whole, while the dead-letter stream is (its
            letters may refer to bodies there)
KEYS[n+11]  the queue's dead-letter stream: deleted only when it is empty
ARGV        none
Reply:      number of keys deleted
Errors:     "delete: expected ..." for another layout; WRONGTYPE (checked before any write:
            another program's key at one of these names is left alone, and so is the queue)
Minimum Redis: 6.2. Cost: O(n); UNLINK frees the streams' memory in the background.
See docs/design.rst (Key layout, Big messages).
]]
--@include common
local bad = check_args('delete', #KEYS >= 12, #ARGV == 0,
                       'KEYS: streams, marker, index, delayed set, delayed messages, ' ..
                       'arguments, counters, id store, key store, staging hash, big ' ..
                       'messages, dlq; no ARGV')
if bad then return bad end
local n = #KEYS - 11
local big, dlq = KEYS[#KEYS - 1], KEYS[#KEYS]
-- every key is checked first (see wrong_type)
local kinds = {'zset', 'set', 'zset', 'hash', 'hash', 'hash', 'zset', 'hash', 'hash', 'hash',
               'stream'}  -- marker ... dlq
for i, key in ipairs(KEYS) do
  local wrong = wrong_type(key, i <= n and 'stream' or kinds[i - n])
  if wrong then return redis.error_reply(wrong) end
end
local deleted = 0
-- UNLINK: a stream of a million entries is freed in the background, not in this call
for i = 1, #KEYS - 2 do deleted = deleted + redis.call('UNLINK', KEYS[i]) end
local letters = redis.call('EXISTS', dlq) == 1 and redis.call('XLEN', dlq) or 0
if letters == 0 then
  deleted = deleted + redis.call('UNLINK', dlq) + redis.call('UNLINK', big)
end
return deleted
