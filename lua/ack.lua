--[[ ack: acknowledge delivered messages of ONE queue and delete them.

KEYS[1..n]  streams of the queue (one hash slot) that hold the messages
ARGV[1]     consumer group (the queue's name)
ARGV[2..]   pairs: stream index k (1..n), entry id
Reply:      number of entries that were pending and are now acked
Errors:     "ack: expected ..." for another layout; WRONGTYPE
Minimum Redis: 6.2. Cost: O(ids) in one XACK and one XDEL per stream and 1,000 ids, plus
XINFO GROUPS when some id was not pending. Acking twice is harmless; only delivered entries
are deleted. See docs/design.rst (Leases).
]]
--@include common
local bad = check_args('ack', #KEYS >= 1, #ARGV >= 3 and #ARGV % 2 == 1,
                       'KEYS: streams; ARGV: group, then pairs: stream index, id')
if bad then return bad end
local group, done = ARGV[1], 0
local by_stream, order = {}, {}
for j = 2, #ARGV, 2 do
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
for _, k in ipairs(order) do done = done + ack_ids(KEYS[k], group, by_stream[k]) end
return done
