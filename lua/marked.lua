--[[ marked: which of some wake markers are set, changing nothing.

KEYS[1..n]  wake markers (zsets): on Redis Cluster all of one hash slot; at most 1000
ARGV        none
Reply:      the 1-based indexes in KEYS of the markers that exist, in order
Errors:     "marked: expected ..." for another layout
Minimum Redis: 6.2. Cost: O(n) EXISTS; read-only (EVALSHA_RO on 7.0+). Why: a consumer on
Redis Cluster waits with BZPOPMIN on at most a few slots per node (each wait holds a pooled
connection); it looks at the markers of its other queues with this, pipelined per node,
once per polling interval. See docs/design.rst (Wake-ups).
]]
--@flags no-writes
--@include common
local bad = check_args('marked', #KEYS >= 1 and #KEYS <= 1000, #ARGV == 0,
                       'KEYS: 1 to 1000 wake markers; no ARGV')
if bad then return bad end
local set = {}
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then set[#set + 1] = i end
end
return set
