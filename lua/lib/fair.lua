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

-- Take up to N staged messages of level LEVEL off their groups' FIFOs in rotation order, one
-- per group per turn: the group after the tail gives its oldest one and becomes the tail, or
-- leaves the rotation when it ran dry. PUT(value) stores each first; when it answers false
-- (or an error) the pop stops there, that message still staged. What the pop learns of the
-- hash (links, heads, tails) is kept in Lua and written back once at the end, so a message
-- costs an HGET and its PUT, and a group a few commands. Returns (taken, more, error): more
-- whether level LEVEL still has staged messages.
local function fair_pop(fair_key, level, n, put)
  local last = redis.call('HGET', fair_key, 'c:' .. level)
  if not last then return 0, false, nil end
  local pre = level .. ':'
  local nxt, head, tail, relinked, dry = {}, {}, {}, {}, {}
  local function next_of(g)
    if nxt[g] == nil then nxt[g] = redis.call('HGET', fair_key, 'x:' .. pre .. g) end
    return nxt[g]
  end
  local taken, steps, done, err = {}, 0, false, nil
  while steps < n do
    local g = next_of(last)
    if head[g] == nil then
      local ht = redis.call('HMGET', fair_key, 'h:' .. pre .. g, 't:' .. pre .. g)
      head[g], tail[g] = tonumber(ht[1]) or 0, tonumber(ht[2]) or 0
    end
    local seq = head[g] + 1
    local mf = 'm:' .. pre .. g .. ':' .. seq
    local value = redis.call('HGET', fair_key, mf)
    if value then
      local ok
      ok, err = put(value)
      if not ok then break end
      taken[#taken + 1] = mf
    end
    steps, head[g] = steps + 1, seq
    if seq < tail[g] then  -- the group has more: it becomes the tail
      last = g
    else  -- dry: out of the rotation (its predecessor LAST stays the tail)
      dry[#dry + 1] = g
      local after = next_of(g)
      if after == g then  -- it was the only one
        done = true
        break
      end
      nxt[last], relinked[last] = after, true
    end
  end
  -- write back: the messages taken, the heads, links and tail, the dry groups' fields
  for j = 1, #taken, 1000 do  -- unpack() has a limit
    redis.call('HDEL', fair_key, unpack(taken, j, math.min(j + 999, #taken)))
  end
  if #taken > 0 and redis.call('HINCRBY', fair_key, FAIR_COUNT, -#taken) <= 0 then
    redis.call('HDEL', fair_key, FAIR_COUNT)  -- none left: the hash goes with its last field
  end
  local gone, drops = {}, {}
  for _, g in ipairs(dry) do
    gone[g] = true
    local k = #drops
    drops[k + 1], drops[k + 2], drops[k + 3] = 'h:' .. pre .. g, 't:' .. pre .. g, 'x:' .. pre .. g
  end
  local sets = {}
  for g, h in pairs(head) do
    if not gone[g] then sets[#sets + 1], sets[#sets + 2] = 'h:' .. pre .. g, h end
  end
  for g in pairs(relinked) do
    if not gone[g] then sets[#sets + 1], sets[#sets + 2] = 'x:' .. pre .. g, nxt[g] end
  end
  if done then
    drops[#drops + 1] = 'c:' .. level
  else
    sets[#sets + 1], sets[#sets + 2] = 'c:' .. level, last
  end
  if #drops > 0 then redis.call('HDEL', fair_key, unpack(drops)) end
  if #sets > 0 then redis.call('HSET', fair_key, unpack(sets)) end
  return #taken, not done, err
end

-- Move up to N staged messages of level stream STREAM into it, in rotation order (one per
-- group per turn), as new entries at its end (a TTL deadline becomes field e, a big
-- message's reference field r: delay.lua's entry_of). Never creates the stream (a deleted
-- queue keeps them staged, for delete to remove). Returns (moved, more, error): more whether
-- the level still has staged messages; error when FAIR_KEY or STREAM holds another type
-- (found before anything was written: the first HGET and the first XADD).
local function fair_move(fair_key, stream, n)
  local _, herr = try('HGET', fair_key, FAIR_COUNT)
  if herr then return 0, true, herr end
  return fair_pop(fair_key, fair_level(stream), n, function(value)
    local id, xerr = try('XADD', stream, 'NOMKSTREAM', '*', unpack(entry_of(value)))
    return id and not xerr, xerr
  end)
end

-- Remove up to N staged messages of level LEVEL from FAIR_KEY (purge), in rotation order,
-- freeing the bodies of big ones in BIG (a hash; another type there: bodies left). Returns
-- (removed, more).
local function fair_drop(fair_key, level, n, big)
  local removed, more = fair_pop(fair_key, level, n, function(value)
    local rest = split_deadline(value)
    if string.sub(rest, 1, 2) == 'r:' then try('HDEL', big, string.sub(rest, 3)) end
    return true
  end)
  return removed, more
end
