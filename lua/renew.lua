--[[ renew: extend the leases of messages this consumer is still working on, in one stream.

KEYS[1]     the stream that holds the messages (a queue's level, or a fanout stream)
ARGV[1]     consumer group (the queue's name)
ARGV[2]     consumer name: only messages this consumer still owns are renewed
ARGV[3..]   entry ids, in increasing order (the channel sends at most 500 per call)
Reply:      the ids, in the order given, whose lease this consumer lost: no longer pending
            under it (reclaimed after a stall, requeued, acked meanwhile), deleted, or their
            stream or group is gone (the queue was deleted)
Errors:     "renew: expected ..." for another layout; WRONGTYPE
Minimum Redis: 6.2 (exclusive ranges). Cost: O(ids + entries this consumer owns between the
first and the last id): one XPENDING of its own range (paged), one XCLAIM (min idle 0,
JUSTID: idle time reset, delivery count kept); on Redis 6.2 also one XRANGE per owned id,
since 6.2 would claim a deleted entry. See docs/design.rst (Leases).
]]
--@include common
local bad = check_args('renew', #KEYS == 1, #ARGV >= 3, 'KEYS: stream; ARGV: group, consumer, ids')
if bad then return bad end
local key, group, me = KEYS[1], ARGV[1], ARGV[2]
local last = ARGV[#ARGV]
local owned, start, page = {}, ARGV[3], #ARGV + 14
while true do
  local p, err = try('XPENDING', key, group, start, last, page, me)
  if err then return redis.error_reply(err) end
  if p == nil then break end  -- no stream or group: every lease is lost
  for _, e in ipairs(p) do owned[e[1]] = true end
  if #p < page then break end
  start = '(' .. p[#p][1]
end
local check = not redis.REDIS_VERSION  -- Redis 6.2 (REDIS_VERSION came with 7.0)
local claim = {key, group, me, 0}
for j = 3, #ARGV do
  local id = ARGV[j]
  if owned[id] and (not check or #redis.call('XRANGE', key, id, id) > 0) then
    claim[#claim + 1] = id
  end
end
local kept = {}
if #claim > 4 then
  claim[#claim + 1] = 'JUSTID'  -- unpack() must come last to expand fully
  for _, id in ipairs(redis.call('XCLAIM', unpack(claim))) do kept[id] = true end
end
local lost = {}
for j = 3, #ARGV do
  if not kept[ARGV[j]] then lost[#lost + 1] = ARGV[j] end
end
return lost
