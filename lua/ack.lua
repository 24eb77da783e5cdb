--[[ ack: acknowledge delivered messages of ONE queue and delete them.

KEYS[1..n]  streams of the queue (one hash slot) that hold the messages
KEYS[n+1]   only with ARGV[3] "b": the queue's big messages (hash), ks:q:{queue}:big
ARGV[1]     consumer group (the queue's name)
ARGV[2]     consumer name: only entries it still owns are acked; one whose lease ran out and
            that another consumer took is left to that one. '' acks whoever owns them
            (operators)
ARGV[3]     optional "b": free the bodies of big messages among the entries deleted (each
            entry is looked up first); the pairs then start at ARGV[4]
ARGV[3..]   pairs: stream index k (1..n), entry id; -k: the consumer knows it still owns
            the entry (read or renewed less than half a lease ago by its clock): acked
            without the ownership lookup
Reply:      {acked, not owned}: entries that were pending and are now acked; entries (each
            counted once) this consumer no longer owns, left alone (0 for '')
Errors:     "ack: expected ..." for another layout; WRONGTYPE (every stream, and the big
            hash, is checked before the first write)
Minimum Redis: 6.2. Cost: O(ids) in one XACK and one XDEL per stream and 1,000 ids, plus
XINFO GROUPS when some id was not pending; for a consumer, one XPENDING per stream of its
own entries from the lowest to the highest id (paged; this is also the type check) unless
all its ids are trusted (-k), for '' a TYPE per stream. With "b", an XRANGE per entry acked
(it copies the entry: the channel sends only big messages' entries this way, a field r
each) and one HDEL. Acking twice is harmless; only delivered entries are deleted, and only
the bodies of entries this call deleted are freed. See docs/design.rst (Leases, Big messages).
]]
--@include common
local big = ARGV[3] == 'b'
local first = big and 4 or 3
local n = big and #KEYS - 1 or #KEYS  -- the streams
local bad = check_args('ack', n >= 1, #ARGV >= first + 1 and (#ARGV - first) % 2 == 1,
                       'KEYS: streams[, big hash]; ARGV: group, consumer[, "b"], then pairs: ' ..
                       'stream index, id')
if bad then return bad end
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
local wrong = big and wrong_type(KEYS[#KEYS], 'hash')
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
local done, free = 0, {}
for _, k in ipairs(order) do
  local deleted = big and {} or nil
  done = done + ack_ids(KEYS[k], group, by_stream[k], deleted)
  for id, token in pairs(tokens[k] or {}) do
    if deleted[id] then free[#free + 1] = token end
  end
end
for j = 1, #free, 1000 do  -- unpack() has a limit
  redis.call('HDEL', KEYS[#KEYS], unpack(free, j, math.min(j + 999, #free)))
end
return {done, stale}
