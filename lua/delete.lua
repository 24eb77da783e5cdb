--[[ delete: delete a queue with all its messages, ready or in flight.

KEYS[1..n]  all streams of ONE queue (one per priority level)
KEYS[n+1]   the queue's wake marker
KEYS[n+2]   the queue's ready index
KEYS[n+3]   the queue's dead-letter stream
ARGV        none
Reply:      number of keys deleted
Minimum Redis: 6.2. Cost: O(n) here; the memory of the streams is freed in the background
(UNLINK).

Dead letters are not dropped with the queue: the dead-letter stream is deleted only when it
is empty, so nothing set aside for an operator disappears silently.
]]
local n = #KEYS - 3
local deleted = 0
-- UNLINK: a stream of a million entries is freed in the background, not in this call
for i = 1, n + 2 do deleted = deleted + redis.call('UNLINK', KEYS[i]) end
if redis.call('EXISTS', KEYS[n + 3]) == 1 and redis.call('XLEN', KEYS[n + 3]) == 0 then
  deleted = deleted + redis.call('UNLINK', KEYS[n + 3])
end
return deleted
