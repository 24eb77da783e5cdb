--[[ requeue: give delivered, unacked messages back to their queue (reject with requeue, and
the restore of unacked messages when a channel closes).

KEYS[1..n]  streams of ONE queue that hold the messages (n: the highest index k in ARGV)
KEYS[n+1]   the queue's wake marker (zset)
KEYS[n+2]   the queue's ready index (set); not given for a fanout stream
ARGV[1]     consumer group (the queue's name)
ARGV[2]     name of the holder consumer that parks requeued messages
ARGV[3..]   triples: stream index k (1..n), entry id, delivery count to keep (-1: keep the
            current one). A message read ahead but never handed to the application goes
            back with its count lowered by one, so it is not counted as delivered.
Reply:      number of messages requeued
Minimum Redis: 6.2. Cost: O(number of ids).

The entry is not copied: its PEL record moves to the holder consumer (XCLAIM JUSTID), so it
keeps its stream (priority) and id, and read.lua serves held entries before newer ones of
the same level; the ready index names HELD..stream for each stream that got one back. An id
that is no longer pending (acked meanwhile), or whose queue or fanout binding is gone, is
left alone.
]]
--@include common
local n = 0
for j = 3, #ARGV, 3 do n = math.max(n, tonumber(ARGV[j])) end
local group, holder, moved = ARGV[1], ARGV[2], 0
-- every key is checked first (see wrong_type): a wrong type found after some XCLAIMs would
-- leave those messages parked without their index member and marker
local wrong = wrong_type(KEYS[n + 1], 'zset') or (KEYS[n + 2] and wrong_type(KEYS[n + 2], 'set'))
for i = 1, n do wrong = wrong or wrong_type(KEYS[i], 'stream') end
if wrong then return redis.error_reply(wrong) end
local held = {}  -- members of the ready index to add
for j = 3, #ARGV, 3 do
  local key, id, count = KEYS[tonumber(ARGV[j])], ARGV[j + 1], tonumber(ARGV[j + 2])
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
if moved > 0 then
  if KEYS[n + 2] then index_add(KEYS[n + 2], KEYS[1], unpack(held)) end
  arm(KEYS[n + 1], KEYS[1])
end
return moved
