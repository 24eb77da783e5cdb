--[[ reclaim: give back messages whose lease ran out, and forget consumers that left.

KEYS[1..n]  all streams of ONE queue (one per priority level); n = #ARGV - 5
KEYS[n+1]   the queue's wake marker (zset)
KEYS[n+2]   the queue's ready index (set); not given for a fanout stream
ARGV[1]     consumer group (the queue's name)
ARGV[2]     name of the holder consumer that parks requeued messages
ARGV[3]     min idle, ms: a delivered message idle this long has lost its lease
            (visibility_timeout; live consumers renew their leases well before it)
ARGV[4]     batch: the most PEL entries to look at per stream in this call
ARGV[5..]   one cursor per stream: scan the PEL after this id ("-" from the start)
ARGV[5+n]   consumer expiry, ms: a consumer that owns nothing and was idle this long is
            removed from the group (0: never)
Reply:      {reclaimed, cursor_1, ..., cursor_n}: messages moved back, and where the next
            call should continue per stream ("-" once the end of the PEL was reached)
Minimum Redis: 6.2 (XPENDING IDLE, exclusive ranges). Cost: O(n * batch), bounded.

A stalled message is not copied: its PEL record moves to the holder (XCLAIM with the min idle
time, so a lease renewed meanwhile is left alone, and JUSTID, so the delivery count is
kept), and the ready index names HELD..stream. read.lua then serves it first in its level and
counts the redelivery; that is where
the delivery limit sends crash-looping messages to the dead-letter stream. Removing a
consumer deletes its PEL records, so only consumers that own nothing are removed.
]]
--@include common
local n = #ARGV - 5
local group, holder = ARGV[1], ARGV[2]
local held = {}  -- members of the ready index to add
local min_idle, batch = tonumber(ARGV[3]), tonumber(ARGV[4])
local expiry = tonumber(ARGV[5 + n])
local reclaimed, cursors = 0, {}
for i = 1, n do
  local key, cursor = KEYS[i], ARGV[4 + i]
  local start = cursor == '-' and '-' or '(' .. cursor
  local stalled, err = try('XPENDING', key, group, 'IDLE', min_idle, start, '+', batch)
  if err then return redis.error_reply(err) end
  local next_cursor = '-'
  if stalled and #stalled > 0 then
    -- XCLAIM key group holder min_idle id... JUSTID (unpack() must be last to expand fully)
    local args = {key, group, holder, min_idle}
    for _, p in ipairs(stalled) do
      if p[2] ~= holder then args[#args + 1] = p[1] end
    end
    if #args > 4 then
      args[#args + 1] = 'JUSTID'
      local got = #redis.call('XCLAIM', unpack(args))
      reclaimed = reclaimed + got
      if got > 0 then held[#held + 1] = HELD .. key end
    end
    if #stalled >= batch then next_cursor = stalled[#stalled][1] end
  end
  cursors[i] = next_cursor
  if stalled and expiry > 0 then
    for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', key, group)) do
      local name = field(c, 'name')
      if name ~= holder and tonumber(field(c, 'pending')) == 0
          and tonumber(field(c, 'idle')) >= expiry then
        redis.call('XGROUP', 'DELCONSUMER', key, group, name)
      end
    end
  end
end
if reclaimed > 0 then
  if KEYS[n + 2] then index_add(KEYS[n + 2], KEYS[1], unpack(held)) end
  arm(KEYS[n + 1], KEYS[1])
end
local reply = {reclaimed}
for i = 1, n do reply[i + 1] = cursors[i] end
return reply
