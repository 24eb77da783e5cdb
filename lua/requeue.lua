--[[ requeue: give delivered, unacked messages back to their queue, to be served first.

KEYS[1..n]  streams of ONE queue that hold the messages (n: the highest index k in ARGV)
KEYS[n+1]   the queue's wake marker (zset)
KEYS[n+2]   the queue's ready index (set); not given for a fanout stream
KEYS[n+3..n+4] optional, with KEYS[n+2]: the queue's arguments (hash) and delayed set,
            for retry backoff: with x-requeue-delay a message delivered n >= 1 times waits,
            parked with ~backoff (docs/design.rst, "Retry backoff")
KEYS[n+5]   optional, with those: the queue's in-flight flag (string), ks:q:{queue}:capped:
            when raised (x-max-in-flight stopped a read with work left) and a message went
            back, the flag is lowered and the marker set (docs/design.rst, "Global
            concurrency")
KEYS[n+6..n+7] optional, with those: the queue's counters (hash) and big messages (hash):
            while the counters keep its waiting bytes (x-max-length-bytes,
            lua/lib/bytes.lua), each message given back adds its size
ARGV[1]     consumer group (the queue's name)
ARGV[2]     consumer name: only entries it still owns are requeued; one whose lease ran out
            and that another consumer took is left to that one. '' requeues whoever owns them
            (operators)
ARGV[3]     name of the holder consumer that parks requeued messages
ARGV[4..]   triples: stream index k (1..n), entry id, delivery count to keep (-1: keep the
            current one; the channel lowers it by one for a message read ahead but never
            handed to the application)
Reply:      {requeued, not owned}: messages requeued, those now waiting included (an id no
            longer pending, or whose queue or fanout binding is gone, is left alone);
            entries (each counted once) this consumer no longer owns, left alone (0 for '')
Errors:     "requeue: expected ..." for another layout; WRONGTYPE (checked before any write)
Minimum Redis: 6.2. Cost: O(number of ids): one XCLAIM per id; for a consumer, one XPENDING
per stream of its own entries from the lowest to the highest id (paged); with backoff an
HGET and a TIME per call, per message that waits an O(log n) ZADD (and an XPENDING of its id
for a count -1); with the flag a TYPE (raised: a ZADD and a DEL); with the waiting bytes
kept an HEXISTS, an XRANGE of one id per message (and an XPENDING of it for '') and an
HINCRBY. Used for reject with requeue and the restore of unacked messages at close.
The holder: see docs/design.rst (Leases).
]]
--@include common
--@include delay
--@include inflight
--@include bytes
local n, ok = 0, #ARGV >= 6 and (#ARGV - 3) % 3 == 0
for j = 4, #ARGV, 3 do
  local k = tonumber(ARGV[j])
  if k == nil or k < 1 or k % 1 ~= 0 then ok = false else n = math.max(n, k) end
end
local bad = check_args('requeue', #KEYS == n + 1 or #KEYS == n + 2 or #KEYS == n + 4 or
  #KEYS == n + 5 or #KEYS == n + 7, ok,
  'KEYS: n streams, marker[, index[, arguments, delayed set[, flag[, counters, big ' ..
  'messages]]]]; ARGV: ' ..
  'group, consumer, holder, triples (stream index 1..n, id, count)')
if bad then return bad end
local group, me, holder, moved, stale = ARGV[1], ARGV[2], ARGV[3], 0, 0
-- every key is checked first (see wrong_type): a wrong type found after some XCLAIMs would
-- leave those messages parked without their index member and marker. For a consumer, the
-- ownership XPENDING of each stream named is its check.
local wrong = wrong_type(KEYS[n + 1], 'zset') or (KEYS[n + 2] and wrong_type(KEYS[n + 2], 'set'))
local dkey = KEYS[n + 4]
local min_ms, max_ms = nil, nil  -- x-requeue-delay, when the queue has it
if dkey and not wrong then min_ms, max_ms, wrong = read_backoff(KEYS[n + 3], dkey) end
if me == '' then
  wrong = wrong or wrong_streams(1, n)
end
local flagged = false  -- x-max-in-flight stopped a read: a slot freed sets the marker
if KEYS[n + 5] and not wrong then flagged, wrong = inflight_flagged(KEYS[n + 5]) end
if wrong then return redis.error_reply(wrong) end
-- x-max-length-bytes: a message given back waits again, its size added (lua/lib/bytes.lua)
local sized = KEYS[n + 6] and lib_bytes().bytes_kept(KEYS[n + 6])
local added = 0
-- Count entry ID of stream KEY as waiting again (it was in flight; for '' one parked with the
-- holder or waiting out a backoff already waits, and counts once).
local function count_back(key, id)
  if not sized then return end
  if me == '' then
    local p = redis.call('XPENDING', key, group, id, id, 1)[1]
    if not p or p[2] == holder or p[2] == BACKOFF then return end
  end
  local e = redis.call('XRANGE', key, id, id)[1]
  if e then added = added + lib_bytes().entry_bytes(e[2], KEYS[n + 7]) end
end
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
local clock = nil  -- TIME, read once, when a message is to wait
-- Retry backoff: park entry ID of stream K with BACKOFF and point to it from the delayed set
-- when its delivery COUNT (-1: as it is) says it waits. True when it did.
local function wait(k, id, count)
  local key = KEYS[k]
  if count < 0 then
    local p = redis.call('XPENDING', key, group, id, id, 1)[1]
    count = p and tonumber(p[4]) or 0
  end
  local delay = backoff_ms(count, min_ms, max_ms)
  if delay <= 0 then return false end
  count_back(key, id)
  if redis.call('XCLAIM', key, group, BACKOFF, 0, id, 'RETRYCOUNT', count, 'JUSTID')[1] then
    clock = clock or redis.call('TIME')
    local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
    park_pointer(dkey, KEYS[n + 2], KEYS[n + 1], key, string.match(key, ':(%d+)$') or '0',
                 id, holder, group, now + delay,
                 string.format('%010d%06d', tonumber(clock[1]), tonumber(clock[2])))
    moved = moved + 1
  end
  return true
end
for j = 4, #ARGV, 3 do
  local k = tonumber(ARGV[j])
  local key, id, count = KEYS[k], ARGV[j + 1], tonumber(ARGV[j + 2])
  if mine[k][id] and min_ms and wait(k, id, count) then
    mine[k][id] = nil  -- waits in the delayed set (or was not pending)
  elseif mine[k][id] then
    mine[k][id] = nil  -- an id given twice goes back (and counts) once
    count_back(key, id)
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
if #held > 0 then  -- parked with the holder (those waiting made their own marks)
  if KEYS[n + 2] then index_add(KEYS[n + 2], KEYS[1], unpack(held)) end
  arm(KEYS[n + 1], KEYS[1])
end
if flagged and moved > 0 then inflight_release(KEYS[n + 5], KEYS[n + 1], KEYS[1], 0) end
if added > 0 then lib_bytes().bytes_add(KEYS[n + 6], KEYS[1], added) end
return {moved, stale}
