--[[ ack: acknowledge delivered messages of ONE queue and delete them.

KEYS[1..n]  streams of the queue (one hash slot) that hold the messages
ARGV[1]     consumer group (the queue's name)
ARGV[2]     consumer name: only entries it still owns are acked; one whose lease ran out and
            that another consumer took is left to that one. '' acks whoever owns them
            (operators)
ARGV[3..]   pairs: stream index k (1..n), entry id
Reply:      {acked, not owned}: entries that were pending and are now acked; entries (each
            counted once) this consumer no longer owns, left alone (0 for '')
Errors:     "ack: expected ..." for another layout; WRONGTYPE (every stream is checked before
            the first write)
Minimum Redis: 6.2. Cost: O(ids) in one XACK and one XDEL per stream and 1,000 ids, plus
XINFO GROUPS when some id was not pending; for a consumer, one XPENDING per stream of its
own entries from the lowest to the highest id (paged; this is also the type check), for ''
a TYPE per stream. Acking twice is harmless; only delivered entries are deleted. See
docs/design.rst (Leases).
]]
--@include common
local bad = check_args('ack', #KEYS >= 1, #ARGV >= 4 and #ARGV % 2 == 0,
                       'KEYS: streams; ARGV: group, consumer, then pairs: stream index, id')
if bad then return bad end
local group, me = ARGV[1], ARGV[2]
local by_stream, order = {}, {}
for j = 3, #ARGV, 2 do
  local k = tonumber(ARGV[j])
  if KEYS[k] == nil then
    return check_args('ack', true, false, 'a stream index 1..' .. #KEYS .. ' at ARGV[' .. j .. ']')
  end
  if not by_stream[k] then
    by_stream[k] = {}
    order[#order + 1] = k
  end
  local ids = by_stream[k]
  ids[#ids + 1] = ARGV[j + 1]
end
-- every stream is looked at before the first write (see wrong_type): a WRONGTYPE after some
-- XACKs would leave half a call done
local stale = 0
for _, k in ipairs(order) do
  local owned, lost, err = owned_ids(KEYS[k], group, me, by_stream[k])
  err = err or (me == '' and wrong_type(KEYS[k], 'stream'))
  if err then return redis.error_reply(err) end
  by_stream[k], stale = owned, stale + lost
end
local done = 0
for _, k in ipairs(order) do done = done + ack_ids(KEYS[k], group, by_stream[k]) end
return {done, stale}
