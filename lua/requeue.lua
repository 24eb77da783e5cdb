--[[ requeue: give delivered, unacked messages back to their queue, to be served first.

KEYS[1..n]  streams of ONE queue that hold the messages (n: the highest index k in ARGV)
KEYS[n+1]   the queue's wake marker (zset)
KEYS[n+2]   the queue's ready index (set); not given for a fanout stream
ARGV[1]     consumer group (the queue's name)
ARGV[2]     consumer name: only entries it still owns are requeued; one whose lease ran out
            and that another consumer took is left to that one. '' requeues whoever owns them
            (operators)
ARGV[3]     name of the holder consumer that parks requeued messages
ARGV[4..]   triples: stream index k (1..n), entry id, delivery count to keep (-1: keep the
            current one; the channel lowers it by one for a message read ahead but never
            handed to the application)
Reply:      {requeued, not owned}: messages requeued (an id no longer pending, or whose queue
            or fanout binding is gone, is left alone); entries (each counted once) this
            consumer no longer owns, left alone (0 for '')
Errors:     "requeue: expected ..." for another layout; WRONGTYPE (checked before any write)
Minimum Redis: 6.2. Cost: O(number of ids): one XCLAIM per id; for a consumer, one XPENDING
per stream of its own entries from the lowest to the highest id (paged). Used for reject
with requeue and the restore of unacked messages at close. The holder: see docs/design.rst
(Leases).
]]
--@include common
local n, ok = 0, #ARGV >= 6 and (#ARGV - 3) % 3 == 0
for j = 4, #ARGV, 3 do
  local k = tonumber(ARGV[j])
  if k == nil or k < 1 or k % 1 ~= 0 then ok = false else n = math.max(n, k) end
end
local bad = check_args('requeue', #KEYS == n + 1 or #KEYS == n + 2, ok,
  'KEYS: n streams, marker[, index]; ARGV: group, consumer, holder, triples (stream index ' ..
  '1..n, id, count)')
if bad then return bad end
local group, me, holder, moved, stale = ARGV[1], ARGV[2], ARGV[3], 0, 0
-- every key is checked first (see wrong_type): a wrong type found after some XCLAIMs would
-- leave those messages parked without their index member and marker. For a consumer, the
-- ownership XPENDING of each stream named is its check.
local wrong = wrong_type(KEYS[n + 1], 'zset') or (KEYS[n + 2] and wrong_type(KEYS[n + 2], 'set'))
if me == '' then
  wrong = wrong or wrong_streams(1, n)
end
if wrong then return redis.error_reply(wrong) end
local ids = {}  -- stream index -> its ids
for j = 4, #ARGV, 3 do
  local k = tonumber(ARGV[j])
  ids[k] = ids[k] or {}
  ids[k][#ids[k] + 1] = ARGV[j + 1]
end
local mine = {}  -- stream index -> set of the ids to requeue
for k = 1, n do
  if ids[k] then
    local owned, lost, err = owned_ids(KEYS[k], group, me, ids[k])
    if err then return redis.error_reply(err) end
    mine[k], stale = {}, stale + lost
    for _, id in ipairs(owned) do mine[k][id] = true end
  end
end
local held = {}  -- members of the ready index to add
for j = 4, #ARGV, 3 do
  local k = tonumber(ARGV[j])
  local key, id, count = KEYS[k], ARGV[j + 1], tonumber(ARGV[j + 2])
  if mine[k][id] then
    local r, err
    if count >= 0 then
      r, err = try('XCLAIM', key, group, holder, 0, id, 'RETRYCOUNT', count, 'JUSTID')
    else
      r, err = try('XCLAIM', key, group, holder, 0, id, 'JUSTID')
    end
    if err then return redis.error_reply(err) end
    if r and #r > 0 then
      moved = moved + #r
      held[#held + 1] = HELD .. key
    end  -- else: no group any more (queue deleted, fanout unbound), or not pending: nothing
  end
end
if moved > 0 then
  if KEYS[n + 2] then index_add(KEYS[n + 2], KEYS[1], unpack(held)) end
  arm(KEYS[n + 1], KEYS[1])
end
return {moved, stale}
