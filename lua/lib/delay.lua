-- A queue's delayed messages, kept until due (a library, included after common): the keys,
-- the member format and why none is missed are in docs/design.rst, "Delayed delivery".

local DELAYED = 'd'  -- ready index member: the delayed set may hold messages

-- A delayed message's value with its TTL DEADLINE (unix ms, nil: none): "e:<deadline>:<value>"
-- (docs/design.rst, "Message TTL"). A Kombu envelope starts with '{' and a big message's
-- reference with "r:", so the prefix is unambiguous.
local function with_deadline(value, deadline)
  if deadline == nil then return value end
  return 'e:' .. deadline .. ':' .. value
end

-- The value and deadline (or nil) of a delayed message's stored VALUE (see with_deadline).
local function split_deadline(value)
  if string.sub(value, 1, 2) ~= 'e:' then return value, nil end
  local colon = string.find(value, ':', 3, true)
  if colon == nil then return value, nil end
  return string.sub(value, colon + 1), string.sub(value, 3, colon - 1)
end

-- The stream entry of a delayed VALUE as a flat field list. "r:<token>" stands for a big
-- message whose body is in the queue's big hash (a Kombu envelope starts with '{'): its entry
-- gets field r = token, nothing is copied. A deadline goes with it as field e.
local function entry_of(value)
  local rest, deadline = split_deadline(value)
  local entry = {'m', rest}
  if string.sub(rest, 1, 2) == 'r:' then entry = {'r', string.sub(rest, 3)} end
  if deadline then
    entry[3], entry[4] = 'e', deadline
  end
  return entry
end

-- The token of each of MEMBERS of the delayed messages' hash BODIES whose value is a big
-- message's reference ("r:<token>", 34 bytes): only values that short are read (HSTRLEN
-- first; a TTL deadline prefix fits in that length), so no message is copied to find out.
-- Returns the tokens, or (nil, error).
local function delayed_tokens(bodies, members)
  local tokens = {}
  for _, m in ipairs(members) do
    local len, err = try('HSTRLEN', bodies, m)
    if err then return nil, err end
    if len > 2 and len <= 64 then
      local v = redis.call('HGET', bodies, m)
      if v then v = split_deadline(v) end
      if v and string.sub(v, 1, 2) == 'r:' then tokens[#tokens + 1] = string.sub(v, 3) end
    end
  end
  return tokens, nil
end

-- Store PAYLOAD in the zset DKEY and hash BODIES, due at DUE ms, to go to LEVEL's stream;
-- LABEL names it for operators, STAMP is the server's time in µs (16 digits). Returns the
-- member and whether it is now the earliest.
local function delay_store(dkey, bodies, level, label, payload, due, stamp)
  local base = stamp .. ':' .. level .. ':' .. label
  local member, n = base, 0
  while redis.call('ZADD', dkey, 'NX', due, member) == 0 do  -- same µs, same label
    n = n + 1
    member = base .. ':' .. n
  end
  redis.call('HSET', bodies, member, payload)
  local first = redis.call('ZRANGE', dkey, 0, 0)[1]
  return member, first == member
end

-- The due time (ms) of the earliest delayed message in DKEY, or nil; or (nil, error) when
-- DKEY holds another type.
local function delay_next(dkey)
  local r, err = try('ZRANGE', dkey, 0, 0, 'WITHSCORES')
  if err then return nil, err end
  if r and r[1] then return tonumber(r[2]), nil end
  return nil, nil
end

-- Retry backoff (x-requeue-delay, docs/design.rst "Retry backoff"). A message given back
-- (requeue, reject with requeue, reclaim) that must wait stays where it is, in its stream's
-- PEL, owned by the consumer BACKOFF, which never reads (like the holder): its id, level,
-- delivery count, TTL field and every other field are kept, nothing is copied. The delayed
-- set gets a pointer to it, a member "<stamp>:<level>:b:<id>:<holder>:<group>" with NO value
-- in the delayed messages' hash (so that hash's length stays the number of delayed
-- messages), which the promotion of due messages turns into a parked entry (XCLAIM to the
-- holder, JUSTID: the count is kept). BACKOFF holds a lease like a consumer, so reclaim gives
-- an entry whose pointer went (cancel, or deleted by hand) back after a lease: never lost.
local BACKOFF = '~backoff'

-- The delay (ms) before a message given back after COUNT deliveries is served again, under
-- x-requeue-delay MIN_MS, MAX_MS: RabbitMQ 4.3's rule, MIN x (deliveries so far), at most MAX;
-- 0 for a message never handed out (count 0: read ahead and given back unseen).
local function backoff_ms(count, min_ms, max_ms)
  if count == nil or count < 1 then return 0 end
  return math.min(min_ms * count, max_ms)
end

-- Point to entry ID of STREAM (level LEVEL), just parked with BACKOFF, from the delayed set
-- DKEY, due at DUE; the ready index INDEX is told ("d") and marker WAKE set when it is the
-- earliest; a new DKEY gets STREAM's expiry. STAMP as for delay_store (the same entry parked
-- twice in one µs would be the same pointer).
local function park_pointer(dkey, index, wake, stream, level, id, holder, group, due, stamp)
  local fresh = redis.call('EXISTS', dkey) == 0
  local member = stamp .. ':' .. level .. ':b:' .. id .. ':' .. holder .. ':' .. group
  redis.call('ZADD', dkey, due, member)
  if fresh then expire_as(dkey, stream) end
  index_add(index, stream, DELAYED)
  if redis.call('ZRANGE', dkey, 0, 0)[1] == member then arm(wake, stream) end
end

-- The parts of a retry's pointer MEMBER (see park_pointer): level, entry id, holder, group;
-- nil for a delayed message's member.
local function pointer_parts(member)
  return string.match(member, '^%d+:(%d+):b:([^:]+):([^:]*):(.*)$')
end

-- Whether BACKOFF still owns entry ID of STREAM in GROUP (reclaim may have given it back
-- after a lease; gone, or the group gone: false), or (nil, error) on another type at STREAM.
local function backoff_owns(stream, group, id)
  local p, err = try('XPENDING', stream, group, id, id, 1)  -- no group: nil, nil
  if err then return nil, err end
  return (p and p[1] and p[1][2] == BACKOFF) or false, nil
end

-- Give the entry pointer MEMBER (see park_pointer) names in STREAM to its holder, if BACKOFF
-- still owns it. Returns true when parked, or (nil, error) on another type at STREAM.
local function unpark(stream, member)
  local _, id, holder, group = pointer_parts(member)
  if id == nil then return nil, nil end
  local owned, err = backoff_owns(stream, group, id)
  if not owned then return nil, err end
  local got = redis.call('XCLAIM', stream, group, holder, 0, id, 'JUSTID')
  return #got > 0, nil
end

-- Move the delayed messages of DKEY/BODIES due at NOW into their level's stream, in due order,
-- at most N and BYTES bytes of them (sized with HSTRLEN before anything is copied; ALONE: the
-- first may be bigger, and moves alone; a big message's reference moves as field r, its body
-- stays where it is; a TTL deadline goes with it, expired or not: the read sets an expired one
-- aside). LEVELS maps a level ('0', '3'...) to its stream key,
-- one of the caller's KEYS; a member whose level is not there (not ours, or another
-- priority_steps) goes to FIRST, the queue's first stream; one whose message is gone is
-- dropped. A retry's pointer (park_pointer) parks its entry with the holder instead, if its level's
-- stream is among LEVELS (else the pointer goes, and reclaim gives the entry back after a
-- lease: it keeps its id, so a unique key it holds stays valid). Returns (moved, ready index
-- members to add: the streams written, and HELD .. stream for parked entries, error, bytes
-- moved, placed: {member, stream, new entry id} per message appended, for the caller to
-- re-point its unique key, lua/lib/unique.lua): on an error (a key holds another type) the
-- members moved so far are removed and the rest stay where they are. DIVERT, optional:
-- DIVERT(member, value, stream) takes a message elsewhere instead of its stream (x-fairness
-- stages it: lua/lib/fair.lua), true when it did.
local function promote(dkey, bodies, levels, first, now, n, bytes, alone, divert)
  local due, err = try('ZRANGEBYSCORE', dkey, '-inf', now, 'LIMIT', 0, n)
  if err then return 0, {}, err, 0, {} end
  if due == nil or #due == 0 then return 0, {}, nil, 0, {} end
  local take, size = {}, 0
  for j, member in ipairs(due) do
    local len, lerr = try('HSTRLEN', bodies, member)
    if lerr then return 0, {}, lerr, 0, {} end
    if size + len > bytes and not (alone and j == 1) then break end
    take[j], size = member, size + len
  end
  if #take == 0 then return 0, {}, nil, 0, {} end
  local payloads, herr = try('HMGET', bodies, unpack(take))
  if herr then return 0, {}, herr, 0, {} end
  local streams, seen, done, moved, placed = {}, {}, {}, 0, {}
  for j, member in ipairs(take) do
    local payload = payloads[j]
    if not payload and string.match(member, '^%d+:%d+:b:') then  -- a retry's pointer
      local stream = levels[string.match(member, '^%d+:(%d+):') or '']
      local held, perr = nil, nil
      if stream then held, perr = unpark(stream, member) end
      if perr then err = perr .. ' (key ' .. stream .. ')'; break end
      if held then
        if not seen[HELD .. stream] then
          seen[HELD .. stream] = true
          streams[#streams + 1] = HELD .. stream
        end
        moved = moved + 1
      end
    elseif payload and divert and divert(member, payload,
                                         levels[string.match(member, '^%d+:(%d+):') or '']
                                         or first) then
      moved = moved + 1
    elseif payload then
      local stream = levels[string.match(member, '^%d+:(%d+):') or ''] or first
      local id, xerr = try('XADD', stream, '*', unpack(entry_of(payload)))
      if xerr then err = xerr .. ' (key ' .. stream .. ')'; break end
      placed[#placed + 1] = {member, stream, id}
      if not seen[stream] then
        seen[stream] = true
        streams[#streams + 1] = stream
      end
      moved = moved + 1
    end
    done[#done + 1] = member
  end
  if #done > 0 then
    redis.call('ZREM', dkey, unpack(done))
    redis.call('HDEL', bodies, unpack(done))
  end
  return moved, streams, err, size, placed
end

-- The queue's x-requeue-delay ("min_ms,max_ms") from its arguments hash ARGS, one HGET per
-- call: (min_ms, max_ms), or nil without it (or a value that does not parse: limits.py checks
-- what it stores), or (nil, nil, error) when ARGS, or with the argument the delayed set DKEY
-- (where requeue and reclaim point to waiting messages), holds another type.
local function read_backoff(args, dkey)
  local v, err = try('HGET', args, 'x-requeue-delay')
  if err then return nil, nil, err end
  local lo, hi = string.match(v or '', '^(%d+),(%d+)$')
  if lo == nil or tonumber(hi) < 1 then return nil, nil, nil end
  err = wrong_type(dkey, 'zset')  -- where the waiting messages' pointers go
  if err then return nil, nil, err end
  return tonumber(lo), tonumber(hi), nil
end
