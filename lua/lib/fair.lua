-- Fair share between the groups of a queue (a library, included after common and delay): a
-- queue with x-fairness round-robin stages each message in its group's FIFO, and a read moves
-- staged messages into the level's stream in rotation order just before it reads them. Why
-- it is correct and what it costs: docs/design.rst, "Fair share".
--
-- KEYS: none of its own. The staging hash (ks:q:{q}:fair, in the queue's slot) comes from the
-- caller, which has it in its KEYS. Its fields, for a level L (the number that ends the level
-- stream's name) and a group G (any string, the message's x-group; '' is the default group):
--   n              messages staged, all levels and groups (size, inspect, status)
--   c:L            the rotation's tail: the group served last at level L; absent: no group
--                  of level L has a staged message
--   x:L:G          the group after G in level L's rotation (a circular list)
--   t:L:G, h:L:G   the last sequence number staged and the last moved of group G at level L
--                  (h absent: 0); t - h messages wait; both go when the group runs dry
--   m:L:G:<seq>    a staged message, as a delayed value (lua/lib/delay.lua: its TTL deadline
--                  prefix, "r:<token>" for a big message)
-- Every operation is O(1) commands per message staged or moved, whatever the number of
-- groups: the rotation is a linked list, never scanned.

local FAIRNESS = 'x-fairness'  -- the queue argument (its only value: round-robin)
local FAIR = 'g:'  -- ready index member prefix: level stream <key>'s staging may hold messages
local FAIR_COUNT = 'n'

-- The level of a level stream's key: the number that ends its name.
local function fair_level(stream)
  return string.match(stream, ':(%d+)$') or '0'
end

-- Stage VALUE (a delayed value: lua/lib/delay.lua's with_deadline) for GROUP at LEVEL in the
-- staging hash FAIR_KEY; a group that had nothing staged joins the rotation as its tail, so
-- it is served after every group already waiting. Returns the staged count of the group.
local function fair_stage(fair_key, level, group, value)
  local tail = redis.call('HINCRBY', fair_key, 't:' .. level .. ':' .. group, 1)
  redis.call('HSET', fair_key, 'm:' .. level .. ':' .. group .. ':' .. tail, value)
  redis.call('HINCRBY', fair_key, FAIR_COUNT, 1)
  local head = tonumber(redis.call('HGET', fair_key, 'h:' .. level .. ':' .. group)) or 0
  local waiting = tail - head
  if waiting == 1 then  -- it was dry: it joins the rotation, last
    local last = redis.call('HGET', fair_key, 'c:' .. level)
    if last then
      local after = redis.call('HGET', fair_key, 'x:' .. level .. ':' .. last)
      redis.call('HSET', fair_key, 'x:' .. level .. ':' .. group, after,
                 'x:' .. level .. ':' .. last, group, 'c:' .. level, group)
    else
      redis.call('HSET', fair_key, 'x:' .. level .. ':' .. group, group, 'c:' .. level, group)
    end
  end
  return waiting
end

-- Take the next staged message of level LEVEL's rotation in FAIR_KEY off its group's FIFO:
-- the group after the tail gives its oldest one and becomes the tail (or leaves the rotation
-- when it ran dry). PUT(value) stores it first and answers false when it cannot (nothing is
-- then changed). Returns (status, more): status 'taken', 'lost' (its value was gone: the
-- group moves on), 'refused' (PUT said no) or nil (the rotation is empty); more whether level
-- LEVEL still has staged messages.
local function fair_take(fair_key, level, put)
  local last = redis.call('HGET', fair_key, 'c:' .. level)
  if not last then return nil, false end
  local group = redis.call('HGET', fair_key, 'x:' .. level .. ':' .. last)
  local hf, tf = 'h:' .. level .. ':' .. group, 't:' .. level .. ':' .. group
  local ht = redis.call('HMGET', fair_key, hf, tf)
  local head, tail = (tonumber(ht[1]) or 0) + 1, tonumber(ht[2]) or 0
  local mf = 'm:' .. level .. ':' .. group .. ':' .. head
  local value = redis.call('HGET', fair_key, mf)
  local status = 'lost'
  if value then
    if not put(value) then return 'refused', true end
    redis.call('HDEL', fair_key, mf)
    if redis.call('HINCRBY', fair_key, FAIR_COUNT, -1) <= 0 then  -- none left: the hash goes
      redis.call('HDEL', fair_key, FAIR_COUNT)
    end
    status = 'taken'
  end
  if head < tail then  -- the group has more: it becomes the tail
    redis.call('HSET', fair_key, hf, head, 'c:' .. level, group)
    return status, true
  end
  -- dry: out of the rotation (its predecessor LAST stays the tail)
  local after = redis.call('HGET', fair_key, 'x:' .. level .. ':' .. group)
  redis.call('HDEL', fair_key, hf, tf, 'x:' .. level .. ':' .. group)
  if after == group then  -- it was the only one
    redis.call('HDEL', fair_key, 'c:' .. level)
    return status, false
  end
  redis.call('HSET', fair_key, 'x:' .. level .. ':' .. last, after)
  return status, true
end

-- Move up to N staged messages of level stream STREAM into it, in rotation order (one per
-- group per turn), as new entries at its end (a TTL deadline becomes field e, a big
-- message's reference field r: delay.lua's entry_of). Never creates the stream (a deleted
-- queue keeps them staged, for delete to remove). Returns (moved, more, error): more whether
-- the level still has staged messages; error when FAIR_KEY or STREAM holds another type
-- (found before anything was written: the first HGET and the first XADD).
local function fair_move(fair_key, stream, n)
  local level, moved, more, err = fair_level(stream), 0, true, nil
  local _, herr = try('HGET', fair_key, FAIR_COUNT)
  if herr then return 0, true, herr end
  local function put(value)
    local id, xerr = try('XADD', stream, 'NOMKSTREAM', '*', unpack(entry_of(value)))
    err = xerr
    return id and not xerr
  end
  local misses = 0  -- values found gone: bounded too
  while moved < n and misses < n do
    local status
    status, more = fair_take(fair_key, level, put)
    if status == 'taken' then moved = moved + 1 else misses = misses + 1 end
    if not more or status == 'refused' or status == nil then break end
  end
  return moved, more, err
end

-- Remove up to N staged messages of level LEVEL from FAIR_KEY (purge), in rotation order,
-- freeing the bodies of big ones in BIG (a hash; another type there: bodies left). Returns
-- (removed, more).
local function fair_drop(fair_key, level, n, big)
  local removed, more = 0, true
  local function put(value)
    local rest = split_deadline(value)
    if string.sub(rest, 1, 2) == 'r:' then try('HDEL', big, string.sub(rest, 3)) end
    return true
  end
  local steps = 0
  while steps < n and more do
    local status
    status, more = fair_take(fair_key, level, put)
    if status == 'taken' then removed = removed + 1 end
    steps = steps + 1
  end
  return removed, more
end
