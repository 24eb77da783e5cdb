--[[ delete: delete a queue with all its messages, ready, delayed or in flight.

KEYS[1..n]  all streams of ONE queue (one per priority level)
KEYS[n+1]   the queue's wake marker
KEYS[n+2]   the queue's ready index
KEYS[n+3]   the queue's delayed set
KEYS[n+4]   the queue's delayed messages
KEYS[n+5]   the queue's dead-letter stream
ARGV        none
Reply:      number of keys deleted
Minimum Redis: 6.2. Cost: O(n) here; the memory of the streams is freed in the background
(UNLINK).

Dead letters are not dropped with the queue: the dead-letter stream is deleted only when it
is empty, so nothing set aside for an operator disappears silently.
]]
local dlq = KEYS[#KEYS]
local deleted = 0
-- UNLINK: a stream of a million entries is freed in the background, not in this call
for i = 1, #KEYS - 1 do deleted = deleted + redis.call('UNLINK', KEYS[i]) end
if redis.call('EXISTS', dlq) == 1 and redis.call('XLEN', dlq) == 0 then
  deleted = deleted + redis.call('UNLINK', dlq)
end
return deleted
