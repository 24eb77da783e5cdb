--[[ delete: delete a queue with all its messages, ready, delayed or in flight.

KEYS[1..n]  all streams of ONE queue (one per priority level)
KEYS[n+1]   the queue's wake marker
KEYS[n+2]   the queue's ready index
KEYS[n+3]   the queue's delayed set
KEYS[n+4]   the queue's delayed messages
KEYS[n+5]   the queue's dead-letter stream: deleted only when it is empty
ARGV        none
Reply:      number of keys deleted
Errors:     "delete: expected ..." for another layout; WRONGTYPE (checked before any write:
            another program's key at one of these names is left alone, and so is the queue)
Minimum Redis: 6.2. Cost: O(n); UNLINK frees the streams' memory in the background.
]]
--@include common
local bad = check_args('delete', #KEYS >= 6, #ARGV == 0,
                       'KEYS: streams, marker, index, delayed set, delayed messages, dlq; no ARGV')
if bad then return bad end
local n = #KEYS - 5
local dlq = KEYS[#KEYS]
-- every key is checked first (see wrong_type)
local kinds = {'zset', 'set', 'zset', 'hash', 'stream'}  -- marker, index, delayed keys, dlq
for i, key in ipairs(KEYS) do
  local wrong = wrong_type(key, i <= n and 'stream' or kinds[i - n])
  if wrong then return redis.error_reply(wrong) end
end
local deleted = 0
-- UNLINK: a stream of a million entries is freed in the background, not in this call
for i = 1, #KEYS - 1 do deleted = deleted + redis.call('UNLINK', KEYS[i]) end
if redis.call('EXISTS', dlq) == 1 and redis.call('XLEN', dlq) == 0 then
  deleted = deleted + redis.call('UNLINK', dlq)
end
return deleted
