--[[ read: deliver up to COUNT ready messages to one consumer, highest priority first.

KEYS[1..S]        the streams to read, in the order to serve them: fanout streams first, then
                  by priority level, then queue order, e.g.
                  ks:x:{bcast}:fanout ks:q:{a}:0 ks:q:{b}:0 ks:q:{a}:3 ...
KEYS[S+2q-1]      wake marker (zset) of source q, for q = 1..Q; a source is a queue's own
                  streams, or its group on one fanout stream (marker ks:x:{ex}:wake:<queue>)
KEYS[S+2q]        dead-letter stream of the queue of source q
ARGV[1]           consumer name (unique per channel)
ARGV[2]           COUNT: the most messages to deliver (the channel's free prefetch)
ARGV[3]           S: number of streams in KEYS
ARGV[4]           name of the holder consumer that parks requeued messages
ARGV[5]           delivery limit: a message about to be delivered more often than this goes
                  to its queue's dead-letter stream instead (0: no limit)
ARGV[6]           Q: number of sources
ARGV[6+q]         ttl in ms for source q's marker (x-expires; 0: the ttl of its first stream)
ARGV[4+Q+3i]      consumer group of stream i (the queue's name)
ARGV[5+Q+3i]      q: index of the source that stream i belongs to (1..Q)
ARGV[6+Q+3i]      "1" if stream i is a fanout stream other groups read too (entries are then
                  only acked, never deleted here; setting one aside trims the stream below
                  what every group is done with), else "0"
Reply: a flat array, four items per delivered message, in delivery order:
       stream index i, entry id, delivery count, payload
Errors: Redis's own (WRONGTYPE when one of our names holds another type).
Minimum Redis: 6.2. Cost: O(S + COUNT + entries set aside, times groups on a fanout
stream) commands; never blocks.

Per stream, requeued and reclaimed messages (parked in the PEL under the holder consumer, so
they keep their place, id and delivery count) are served before new entries of the same
stream; this is the one place where redeliveries are counted against the delivery limit, so
crash loops (reclaims) count as much as rejects. A held message set aside by the limit
(reason "delivery limit", deliveries = times delivered so far) makes room for the next one
in serving order, held ones still first. An entry with no "m" field cannot be a
message of ours: it goes to the queue's dead-letter stream at once.

Wake-ups (see kombu_streams/poller.py for the whole argument): afterwards each queue's marker is
set if the queue may still hold ready messages, and removed when this call has seen all of its
streams run dry. A consumer that popped the marker always runs this script next, so another
consumer is woken whenever work is left over.
]]
--@include common

local consumer, left, S, holder = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local limit, Q = tonumber(ARGV[5]), tonumber(ARGV[6])
local first = {}        -- source index -> its first stream (whose ttl its marker copies)
local out = {}
local maybe_more = {}   -- queue index -> true while ready messages may remain

local function deliver(i, key, group, q, id, fields, deliveries, shared)
  local payload = field(fields, 'm')
  if payload == nil then
    dead_letter(key, group, id, fields, KEYS[S + 2 * q], 'malformed: no m field', deliveries,
                shared)
    return
  end
  out[#out + 1] = i
  out[#out + 1] = id
  out[#out + 1] = deliveries
  out[#out + 1] = payload
  left = left - 1
end

for i = 1, S do
  local base = 3 + Q + 3 * i
  local key, group, q = KEYS[i], ARGV[base + 1], tonumber(ARGV[base + 2])
  local shared = ARGV[base + 3] == '1'
  first[q] = first[q] or key
  if left <= 0 then
    -- Not read: may hold ready messages unless empty (cheap; XLEN also counts in-flight ones).
    if redis.call('XLEN', key) > 0 then maybe_more[q] = true end
  else
    local want = left
    local held, err = try('XPENDING', key, group, '-', '+', want, holder)
    if err then return redis.error_reply(err) end
    if held == nil then
      held = {}
      if shared then  -- a fanout group is made by its binding (at new messages), never here
        key = nil
      else
        local exists, gerr = ensure_group(key, group)
        if gerr then return redis.error_reply(gerr) end
        if not exists then key = nil end
      end
    end
    if key then
      -- Held entries first, in id order. One that is not delivered (set aside by the delivery
      -- limit, or deleted while parked) leaves room, so look again: a fresh entry never
      -- overtakes a held one. Every pass empties what it saw from the holder, so this ends.
      -- A held entry that was delivered before (reclaimed after a crash, or requeued after
      -- the application saw it) is delivered alone: if it is what crashes consumers, the
      -- messages read with it would share its fate and its delivery count. Read-ahead that
      -- went back unseen (count 0) is batched as usual.
      while #held > 0 do
        local take, suspect = {}, false
        for _, p in ipairs(held) do
          if tonumber(p[4]) >= 1 then
            suspect = true
            if #take == 0 and #out == 0 then take[1] = p end
            break
          end
          take[#take + 1] = p
        end
        if #take == 0 then  -- the next one must go alone, and this read has others already
          maybe_more[q] = true
          left = 0
          break
        end
        local ids, counts = {}, {}
        for j, p in ipairs(take) do
          ids[j] = p[1]
          counts[p[1]] = tonumber(p[4]) + 1
        end
        local before = #out
        local claimed = redis.call('XCLAIM', key, group, consumer, 0, unpack(ids))
        local seen = {}
        for _, e in ipairs(claimed) do
          if type(e) == 'table' then
            seen[e[1]] = true
            if limit > 0 and counts[e[1]] > limit then
              dead_letter(key, group, e[1], e[2], KEYS[S + 2 * q], 'delivery limit',
                          counts[e[1]] - 1, shared)
            else
              deliver(i, key, group, q, e[1], e[2], counts[e[1]], shared)
            end
          end
        end
        -- Entries deleted while parked (Redis 6.2 keeps them in the PEL): drop the PEL record.
        for _, id in ipairs(ids) do
          if not seen[id] then redis.call('XACK', key, group, id) end
        end
        if suspect and #out > before then  -- delivered what came before a suspect, or it
          maybe_more[q] = true
          left = 0
          break
        end
        if not suspect and #held < want then break end  -- that was the last held entry
        if left <= 0 then
          maybe_more[q] = true
          break
        end
        want = left
        held = redis.call('XPENDING', key, group, '-', '+', want, holder)
      end
      if left > 0 then
        want = left
        local fresh = read_entries(redis.call(
          'XREADGROUP', 'GROUP', group, consumer, 'COUNT', want, 'STREAMS', key, '>'))
        for _, e in ipairs(fresh) do deliver(i, key, group, q, e[1], e[2], 1, shared) end
        if #fresh >= want then
          -- COUNT filled: more is left unless we just took the stream's last entry.
          local top = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
          if top[1] and top[1][1] ~= fresh[#fresh][1] then maybe_more[q] = true end
        end
      end
    end
  end
end

for q = 1, Q do
  if maybe_more[q] then
    arm(KEYS[S + 2 * q - 1], first[q], ARGV[6 + q])
  else
    redis.call('ZREM', KEYS[S + 2 * q - 1], 'w')
  end
end
return out
