--[[ read: deliver up to COUNT ready messages to one consumer, highest priority first.

KEYS[1..S]        the streams to read, in the order to serve them: fanout streams first, then
                  by priority level, then queue order, e.g.
                  ks:x:{bcast}:fanout ks:q:{a}:0 ks:q:{b}:0 ks:q:{a}:3 ...
KEYS[S+3q-2]      wake marker (zset) of source q, for q = 1..Q; a source is a queue's own
                  streams, or its group on one fanout stream (marker ks:x:{ex}:wake:<queue>)
KEYS[S+3q-1]      dead-letter stream of the queue of source q
KEYS[S+3q]        ready index (set) of the queue of source q, ks:q:{queue}:ready; for a
                  fanout source not used (the caller passes any key of its slot)
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
ARGV[7+Q+3S]      "1": walk every stream of every queue and rebuild the ready indexes (the
                  client asks for this now and then, as a repair), else "0"
Reply: a flat array, four items per delivered message, in delivery order:
       stream index i, entry id, delivery count, payload
Errors: Redis's own (WRONGTYPE when one of our names holds another type).
Minimum Redis: 6.2. Cost: one SMEMBERS per queue, plus commands only for the streams its ready
index names (and always for fanout streams), O(COUNT + entries set aside, times groups on a
fanout stream); a walk (ARGV flag, or an index without its COMPLETE member) costs O(S + COUNT)
commands as every read did before the index. Never blocks.

Ready index (see lua/lib/common.lua): a stream the index does not name holds no ready message,
so it is skipped; held entries are looked up (XPENDING) only where the index names HELD..key.
A member is removed once this call saw that part of its stream run dry, and the walk adds
members for what it found. Streams of other priority levels than KEYS (another process's
priority_steps) keep their members.

Per stream, requeued and reclaimed messages (parked in the PEL under the holder consumer, so
they keep their place, id and delivery count) are served before new entries of the same
stream; this is the one place where redeliveries are counted against the delivery limit, so
crash loops (reclaims) count as much as rejects. A held message set aside by the limit
(reason "delivery limit", deliveries = times delivered so far) makes room for the next one
in serving order, held ones still first. An entry with no "m" field cannot be a
message of ours: it goes to the queue's dead-letter stream at once.

Wake-ups (see kombu_streams/poller.py for the whole argument): afterwards each queue's marker is
set if the queue may still hold ready messages (its index names one of KEYS' streams), and
removed when this call has seen all of its streams run dry. A consumer that popped the marker always runs this script next, so another
consumer is woken whenever work is left over.
]]
--@include common

local consumer, left, S, holder = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local limit, Q = tonumber(ARGV[5]), tonumber(ARGV[6])
local walk_all = ARGV[7 + Q + 3 * S] == '1'
local first = {}        -- source index -> its first stream (whose ttl its marker copies)
local out = {}
local maybe_more = {}   -- source index -> true while ready messages may remain
local index = {}        -- queue source index -> its ready index as a table (member -> true)
local had = {}          -- queue source index -> the members it had before this call
local walk = {}         -- queue source index -> true when every stream is looked at
local mine = {}         -- queue source index -> its streams in KEYS
local alive = {}        -- queue source index -> true once one of its streams was found

local function deliver(i, key, group, q, id, fields, deliveries, shared)
  local payload = field(fields, 'm')
  if payload == nil then
    dead_letter(key, group, id, fields, KEYS[S + 3 * q - 1], 'malformed: no m field',
                deliveries, shared)
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
  local q = tonumber(ARGV[base + 2])
  if ARGV[base + 3] ~= '1' and not index[q] then
    local members, set = redis.call('SMEMBERS', KEYS[S + 3 * q]), {}
    for _, m in ipairs(members) do set[m] = true end
    index[q], had[q], mine[q] = set, {}, {}
    for m in pairs(set) do had[q][m] = true end
    walk[q] = walk_all or not set[COMPLETE]
  end
  if index[q] then
    mine[q][#mine[q] + 1] = KEYS[i]
    if walk[q] then  -- assume both parts may hold work; what is found dry is removed below
      index[q][KEYS[i]] = true
      index[q][HELD .. KEYS[i]] = true
    end
  end
end

for i = 1, S do
  local base = 3 + Q + 3 * i
  local key, group, q = KEYS[i], ARGV[base + 1], tonumber(ARGV[base + 2])
  local shared = ARGV[base + 3] == '1'
  local idx, name = index[q], KEYS[i]
  first[q] = first[q] or key
  if left <= 0 then
    -- Not read: may hold ready messages unless empty (cheap; XLEN also counts in-flight ones).
    if not idx then
      if redis.call('XLEN', key) > 0 then maybe_more[q] = true end
    elseif walk[q] then
      if redis.call('XLEN', key) == 0 then key = nil end
    end
  elseif idx and not idx[name] and not idx[HELD .. name] then
    key = nil  -- nothing ready here
  else
    local has_group = false  -- known to exist (XPENDING answered)
    if not idx or idx[HELD .. name] then
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
      has_group = key ~= nil
      local held_left = false
      -- Held entries first, in id order. One that is not delivered (set aside by the delivery
      -- limit, or deleted while parked) leaves room, so look again: a fresh entry never
      -- overtakes a held one. Every pass empties what it saw from the holder, so this ends.
      -- A held entry that was delivered before (reclaimed after a crash, or requeued after
      -- the application saw it) is delivered alone: if it is what crashes consumers, the
      -- messages read with it would share its fate and its delivery count. Read-ahead that
      -- went back unseen (count 0) is batched as usual.
      while key and #held > 0 do
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
          held_left = true
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
              dead_letter(key, group, e[1], e[2], KEYS[S + 3 * q - 1], 'delivery limit',
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
          held_left = true
          left = 0
          break
        end
        if not suspect and #held < want then break end  -- that was the last held entry
        if left <= 0 then
          maybe_more[q] = true
          held_left = true
          break
        end
        want = left
        held = redis.call('XPENDING', key, group, '-', '+', want, holder)
      end
      if idx and not held_left then idx[HELD .. name] = nil end
    end
    if key and left > 0 and (not idx or idx[name]) then
      local want = left
      local reply, err = try_read(
        'XREADGROUP', 'GROUP', group, consumer, 'COUNT', want, 'STREAMS', key, '>')
      if err then return redis.error_reply(err) end
      if reply == nil and not has_group and not shared then  -- no group (or no stream) yet
        local exists, gerr = ensure_group(key, group)
        if gerr then return redis.error_reply(gerr) end
        if exists then
          reply = redis.call(
            'XREADGROUP', 'GROUP', group, consumer, 'COUNT', want, 'STREAMS', key, '>')
        else
          key = nil
        end
      end
      local fresh = read_entries(reply)
      for _, e in ipairs(fresh) do deliver(i, key, group, q, e[1], e[2], 1, shared) end
      local more = false
      if key and #fresh >= want then
        -- COUNT filled: more is left unless we just took the stream's last entry.
        local top = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
        more = top[1] ~= nil and top[1][1] ~= fresh[#fresh][1]
      end
      if more then
        maybe_more[q] = true
      elseif idx then
        idx[name] = nil
      end
    end
  end
  if idx then
    if key then
      alive[q] = true
    else  -- skipped (names nothing), or a missing stream or group, which holds nothing
      idx[name], idx[HELD .. name] = nil, nil
    end
  end
end

for q = 1, Q do
  local wake, idx = KEYS[S + 3 * q - 2], index[q]
  if idx then
    local adds, drops = {}, {}
    if walk[q] and alive[q] then idx[COMPLETE] = true end
    for m in pairs(idx) do if not had[q][m] then adds[#adds + 1] = m end end
    for m in pairs(had[q]) do if not idx[m] then drops[#drops + 1] = m end end
    if #drops > 0 then redis.call('SREM', KEYS[S + 3 * q], unpack(drops)) end
    if #adds > 0 then
      redis.call('SADD', KEYS[S + 3 * q], unpack(adds))
      local ttl = tonumber(ARGV[6 + q]) or 0
      if ttl <= 0 then ttl = redis.call('PTTL', first[q]) end
      if ttl > 0 then redis.call('PEXPIRE', KEYS[S + 3 * q], ttl) end
    end
    for _, name in ipairs(mine[q]) do
      if idx[name] or idx[HELD .. name] then maybe_more[q] = true end
    end
  end
  if maybe_more[q] then
    arm(wake, first[q], ARGV[6 + q])
  else
    redis.call('ZREM', wake, 'w')
  end
end
return out
