--[[ ack: acknowledge delivered messages and delete them, so acked work takes no memory.

KEYS[1..n]  streams of ONE queue (one hash slot) that hold the messages
ARGV[1]     consumer group (the queue's name)
ARGV[2..]   pairs: stream index k (1..n), entry id
Reply:      number of entries that were pending and are now acked
Minimum Redis: 6.2. Cost: O(number of ids) work in 2 commands per stream (one XACK and one
XDEL of up to 1,000 ids each), plus XINFO GROUPS when some id was not pending. The work is
ack_ids in lua/lib/common.lua, which read.lua runs too for the acks that ride with a read.

An id that is no longer pending (acked already, or the queue was purged or deleted) is
skipped: acking twice is harmless. An entry is deleted only when the group had delivered it
(its id is at or before the group's last-delivered id), so an entry that was never delivered
is never deleted by a stray ack. When XACK acked every id, all of them were pending, so all
are deleted at once. Otherwise the ids are checked against the last-delivered id: every
script deletes an entry in the same call that acks it, so a delivered entry that is not
pending is gone already, and deleting it again changes nothing.
]]
--@include common
local group, done = ARGV[1], 0
local by_stream, order = {}, {}
for j = 2, #ARGV, 2 do
  local k = tonumber(ARGV[j])
  if not by_stream[k] then
    by_stream[k] = {}
    order[#order + 1] = k
  end
  local ids = by_stream[k]
  ids[#ids + 1] = ARGV[j + 1]
end
for _, k in ipairs(order) do done = done + ack_ids(KEYS[k], group, by_stream[k]) end
return done
