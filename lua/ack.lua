--[[ ack: acknowledge delivered messages of ONE queue and delete them.

KEYS[1..n]  streams of the queue (one hash slot) that hold the messages
KEYS[n+1]   only with ARGV[3] "b" or "bu": the queue's big messages (hash), ks:q:{queue}:big
KEYS[..]    only with ARGV[3] "u" or "bu": the queue's key store (hash), ks:q:{queue}:unique
KEYS[#-1,#] only with a mode ending in "c" (below): the queue's in-flight flag (string),
            ks:q:{queue}:capped, and its wake marker (zset)
ARGV[1]     consumer group (the queue's name)
ARGV[2]     consumer name: only entries it still owns are acked; one whose lease ran out and
            that another consumer took is left to that one. '' acks whoever owns them
            (operators)
ARGV[3]     optional "b": free the bodies of big messages among the entries deleted (each
            entry is looked up first); the pairs then start at ARGV[4]. Or "u" / "bu": the
            entries hold unique keys (x-unique-key), each released when its entry is deleted
            here (or kept until x-unique-ttl ms from now: throttle); then ARGV[4] is m, the
            number of pairs, ARGV[5..4+m] the key of each pair in order ('': none), and the
            pairs start at ARGV[5+m]. docs/design.rst, Unique keys. Any of these, or none
            ("c"), may end in "c": when the call frees a slot (acks an entry that was
            pending) and the queue's in-flight flag is raised (its x-max-in-flight stopped a
            read with ready work left), the flag is lowered and the marker set, so a waiting
            consumer reads (docs/design.rst, Global concurrency). The channel always sends it
ARGV[3..]   pairs: stream index k (1..n), entry id; -k: the consumer knows it still owns
            the entry (read or renewed less than half a lease ago by its clock): acked
            without the ownership lookup
Reply:      {acked, not owned}: entries that were pending and are now acked; entries (each
            counted once) this consumer no longer owns, left alone (0 for '')
Errors:     "ack: expected ..." for another layout; WRONGTYPE (every stream, the big hash,
            the key store, the flag and, when the flag is raised, the marker are checked
            before the first write)
Minimum Redis: 6.2. Cost: O(ids) in one XACK and one XDEL per stream and 1,000 ids, plus
XINFO GROUPS when some id was not pending; for a consumer, one XPENDING per stream of its
own entries from the lowest to the highest id (paged; this is also the type check) unless
all its ids are trusted (-k), for '' a TYPE per stream. With "b", an XRANGE per entry acked
(it copies the entry: the channel sends only big messages' entries this way, a field r
each) and one HDEL. Acking twice is harmless; only delivered entries are deleted, and only
the bodies of entries this call deleted are freed. With "u", a TYPE of the key store and,
per 1,000 keys, an HMGET, an HDEL and an HSET and a TIME (for throttled ones). With "c", a
TYPE of the flag (all a queue without x-max-in-flight pays); when it is raised, a TYPE of
the marker, a ZADD and a DEL.
See docs/design.rst (Leases, Big messages, Global concurrency).
]]
--@include common
--@include unique
--@include inflight
local mode = string.match(ARGV[3] or '', '^b?u?c?$')  -- nil for a pair's stream index
mode = mode ~= '' and mode or nil
local big = mode ~= nil and string.find(mode, 'b', 1, true) ~= nil
local first = mode and 4 or 3
-- unique keys: ARGV[4] m, then m keys, then the m pairs (docs/design.rst, Unique keys)
local keyed, m = mode ~= nil and string.find(mode, 'u', 1, true) ~= nil, 0
if keyed then
  m = tonumber(ARGV[4]) or -1
  first = 5 + m
end
local capped = mode ~= nil and string.find(mode, 'c', 1, true) ~= nil
local n = #KEYS - (big and 1 or 0) - (keyed and 1 or 0) - (capped and 2 or 0)  -- the streams
local bad = check_args('ack', n >= 1, #ARGV >= first + 1 and (#ARGV - first) % 2 == 1
                       and (not keyed or (m >= 1 and #ARGV == 4 + 3 * m)),
                       'KEYS: streams[, big hash][, key store][, flag, marker]; ARGV: group, ' ..
                       'consumer[, "b", "u" or "bu", each maybe with "c" after, or "c"[, m, ' ..
                       'm keys]], then pairs: stream index, id')
if bad then return bad end
local bigkey, ustore = KEYS[n + 1], KEYS[n + (big and 2 or 1)]
local flag, wake = KEYS[#KEYS - 1], KEYS[#KEYS]
local group, me = ARGV[1], ARGV[2]
local pairs_of, order, at = ack_pairs(first, n)
if not pairs_of then
  return check_args('ack', true, false, 'a stream index 1..' .. n .. ' at ARGV[' .. at ..
                    '] (negative: trusted)')
end
-- every stream is looked at before the first write (see wrong_type): a WRONGTYPE after some
-- XACKs would leave half a call done. The ownership lookup (XPENDING) is that look; a stream
-- with trusted acks only gets a TYPE when another stream comes before or after it (alone,
-- its XACK is the first write, and fails alone).
local stale = 0
local wrong = (big and wrong_type(bigkey, 'hash')) or (keyed and wrong_type(ustore, 'hash'))
local flagged = false  -- x-max-in-flight stopped a read: a freed slot sets the marker
if capped and not wrong then
  flagged, wrong = inflight_flagged(flag)
  if flagged then wrong = wrong_type(wake, 'zset') end
end
if wrong then return redis.error_reply(wrong) end
local by_stream = {}
for _, k in ipairs(order) do
  local owned, lost, err = ackable(KEYS[k], group, me, pairs_of[k])
  local unlooked = me == '' or #pairs_of[k][1] == 0
  if not err and unlooked and (me == '' or #order > 1) then
    err = wrong_type(KEYS[k], 'stream')
  end
  if err then return redis.error_reply(err) end
  by_stream[k], stale = owned, stale + lost
end
-- big messages: the token of each entry about to be acked, looked up before it is deleted
local tokens = {}  -- stream index -> id -> token
if big then
  for _, k in ipairs(order) do
    tokens[k] = {}
    for _, id in ipairs(by_stream[k]) do
      local e = redis.call('XRANGE', KEYS[k], id, id)[1]
      local token = e and field(e[2], 'r')
      if token then tokens[k][id] = token end
    end
  end
end
local done, free, gone = 0, {}, {}
for _, k in ipairs(order) do
  local deleted = (big or keyed) and {} or nil
  done = done + ack_ids(KEYS[k], group, by_stream[k], deleted)
  gone[k] = deleted
  for id, token in pairs(tokens[k] or {}) do
    if deleted[id] then free[#free + 1] = token end
  end
end
chunked('HDEL', bigkey, free)
if keyed then  -- the key of each entry deleted here is free (or throttled) from now on
  local items = {}
  for j = 1, m do
    local at = first + 2 * (j - 1)
    local k = math.abs(tonumber(ARGV[at]))
    if ARGV[4 + j] ~= '' and gone[k][ARGV[at + 1]] then
      items[#items + 1] = {ARGV[4 + j], string.match(KEYS[k], ':(%d+)$') or '0', ARGV[at + 1]}
    end
  end
  if #items > 0 then lib_unique().unique_release(ustore, items, now_ms) end
end
if flagged and done > 0 then inflight_release(flag, wake, KEYS[1], 0) end
return {done, stale}
