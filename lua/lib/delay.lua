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

-- Move the delayed messages of DKEY/BODIES due at NOW into their level's stream, in due order,
-- at most N and BYTES bytes of them (sized with HSTRLEN before anything is copied; ALONE: the
-- first may be bigger, and moves alone; a big message's reference moves as field r, its body
-- stays where it is; a TTL deadline goes with it, expired or not: the read sets an expired one
-- aside). LEVELS maps a level ('0', '3'...) to its stream key,
-- one of the caller's KEYS; a member whose level is not there (not ours, or another
-- priority_steps) goes to FIRST, the queue's first stream; one whose message is gone is
-- dropped. Returns (moved, streams written, error, bytes moved): on an error (a key holds
-- another type) the members moved so far are removed and the rest stay where they are.
local function promote(dkey, bodies, levels, first, now, n, bytes, alone)
  local due, err = try('ZRANGEBYSCORE', dkey, '-inf', now, 'LIMIT', 0, n)
  if err then return 0, {}, err, 0 end
  if due == nil or #due == 0 then return 0, {}, nil, 0 end
  local take, size = {}, 0
  for j, member in ipairs(due) do
    local len, lerr = try('HSTRLEN', bodies, member)
    if lerr then return 0, {}, lerr, 0 end
    if size + len > bytes and not (alone and j == 1) then break end
    take[j], size = member, size + len
  end
  if #take == 0 then return 0, {}, nil, 0 end
  local payloads, herr = try('HMGET', bodies, unpack(take))
  if herr then return 0, {}, herr, 0 end
  local streams, seen, done, moved = {}, {}, {}, 0
  for j, member in ipairs(take) do
    local payload = payloads[j]
    if payload then
      local stream = levels[string.match(member, '^%d+:(%d+):') or ''] or first
      local _, xerr = try('XADD', stream, '*', unpack(entry_of(payload)))
      if xerr then err = xerr .. ' (key ' .. stream .. ')'; break end
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
  return moved, streams, err, size
end
