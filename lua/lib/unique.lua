-- Unique until done (a library, included after common): a message with the header
-- x-unique-key is stored only while no other message with that key is alive in its queue.
-- Why and what it costs: docs/design.rst, "Unique keys".
-- KEYS: none of its own. Each function takes the keys it touches (the queue's key store, its
-- streams, its delayed set) from its caller, which has them in its KEYS with the queue's tag.
--
-- The key store, ks:q:{q}:unique (hash):
--   "k:<key>"     -> where the message holding the key is: "s:<ttl>:<level>:<entry id>" (a
--                    stream entry), "d:<ttl>:<member>" (a delayed message), "g:<ttl>:<field>"
--                    (a message staged in a fair queue's staging hash, field m:<L>:<G>:<seq>:
--                    lua/lib/fair.lua), or "t:<until>" (acked, throttled until that unix ms);
--                    <ttl> is x-unique-ttl when it was published (0: none)
--   "d:<member>"  -> the key of that delayed message (so purge frees the key it deletes)
--   "g:<field>"   -> the key of that staged message (the same, and a read that moves it into
--                    its stream re-points the key at its entry). A group's field names come
--                    back once it ran dry, so every staging writes or clears the reverse
--                    field of its name (an HDEL for a message without a key: one left by a
--                    message that went without our scripts, deleted by hand or moved by an
--                    older release's read, goes), and a "g:" reference holds its key only
--                    while the reverse field of its field names that key
--   UNIQUE_COUNT  -> the number of publishes refused because their key was taken
--   "c", "a", "t" -> the sweep's place: its cursor and offset ("" or absent: no cycle under
--                    way), the field it resumes at, the keyed publishes since it last
--                    stepped or looked (lua/lib/unique_sweep.lua)
--
--@lazy: built only when a call needs it; callers write lib_unique().helper(...)
-- (kombu_streams/flatten.py).

local UNIQUE_COUNT = 'n'
local UNIQUE_MODE, UNIQUE_TTL = 'x-unique-mode', 'x-unique-ttl'

-- The parts of reference REF: kind ('s', 'd', 'g' or 't'), then for 's' (ttl, level, id), for
-- 'd' (ttl, member), for 'g' (ttl, staging field), for 't' (until).
local function unique_parse(ref)
  local kind = string.sub(ref, 1, 1)
  if kind == 't' then return kind, tonumber(string.sub(ref, 3)) end
  if kind == 's' then  -- the sweep parses one per field it looks at: one match
    local ttl, level, id = string.match(ref, '^s:(%d+):(%d+):(.+)$')
    return kind, tonumber(ttl), level, id
  end
  local ttl, rest = string.match(ref, '^%a:(%d+):(.*)$')
  return kind, tonumber(ttl), rest
end

-- Where the message that holds KEY in STORE is, found by looking at it (so a key whose message
-- is gone, however it went, is free): nil (free), 'throttled', 'delayed' (member), 'staged'
-- (its field in the staging hash FAIR), 'ready' (stream key, id: not delivered yet), 'taken'
-- (delivered and not settled, or parked with the holder, or a big message: never replaced;
-- or staged, when the caller has no FAIR to look in). LEVELS maps a
-- level to its stream key; DKEY is the delayed set, GROUP the queue's group; CLOCK() the
-- time in unix ms (asked only for a throttled key).
-- Returns (state, ref, a, b) or (nil, nil, nil, nil, error). O(1) commands: an HGET, then
-- an XRANGE of one id and XINFO GROUPS (one group), a ZSCORE or an HEXISTS.
local function unique_holder(store, key, levels, dkey, group, clock, fair)
  local ref, err = try('HGET', store, 'k:' .. key)
  if err then return nil, nil, nil, nil, err end
  if not ref then return nil end
  local kind, a, b, c = unique_parse(ref)
  if kind == 't' then
    if a and a > clock() then return 'throttled', ref end
    return nil, ref
  end
  if kind == 'd' then
    local score, zerr = try('ZSCORE', dkey, b)
    if zerr then return nil, nil, nil, nil, zerr end
    if score then return 'delayed', ref, b end
    -- gone: deleted (purge, cancel) or moved to its stream by a read, which does not say
    -- where to (a read of an older release, without the store): free, so no key outlives
    -- its message
    return nil, ref
  end
  if kind == 'g' then
    if not fair then return 'taken', ref end
    local staged, herr = try('HEXISTS', fair, b)
    if herr then return nil, nil, nil, nil, herr end
    -- a field's name comes back once its group ran dry: it is this message only while the
    -- reverse field, which every staging writes or clears, names this key
    if staged == 1 and redis.call('HGET', store, 'g:' .. b) == key then
      return 'staged', ref, b
    end
    return nil, ref  -- moved by a read (which re-points the key) or purged: free
  end
  local stream = levels[b or '']
  if not stream then return nil, ref end
  local found, xerr = try('XRANGE', stream, c, c)
  if xerr then return nil, nil, nil, nil, xerr end
  if not found or #found == 0 then return nil, ref end  -- acked, set aside, purged...
  if field(found[1][2], 'r') then return 'taken', ref end  -- big: never replaced
  if id_before(last_delivered(stream, group), c) then return 'ready', ref, stream, c end
  return 'taken', ref
end

-- Whether the waiting message STATE/A (unique_holder's 'ready' entry, 'delayed' member A of
-- the delayed messages' hash BODIES, or 'staged' field A of the staging hash FAIR) may be
-- replaced: not a big message's reference (its body would need the big hash). Returns (ok,
-- error) (BODIES or FAIR of another type).
local function unique_replaceable(state, a, bodies, fair)
  if state == 'ready' then return true, nil end
  local hash = (state == 'delayed' and bodies) or (state == 'staged' and fair)
  if not hash then return false, nil end
  local len, err = try('HSTRLEN', hash, a)
  if err then return false, err end
  if len > 64 then return true, nil end  -- a reference is short: read only what could be one
  local v = redis.call('HGET', hash, a) or ''  -- "r:<token>", or "e:<deadline>:r:<token>"
  return not (string.sub(v, 1, 2) == 'r:' or string.match(v, '^e:%d+:r:') ~= nil), nil
end

-- Remove the waiting message STATE/A/B ('delayed' member A, 'staged' field A of the staging
-- hash FAIR, or 'ready' entry B of stream A) that a message in replace mode replaces, once
-- that one was stored. A staged one leaves a gap in its group's FIFO, which the rotation
-- passes over (lua/lib/fair.lua's fair_pop), and the count of staged messages drops now.
local function unique_drop(store, state, a, b, dkey, bodies, fair)
  if state == 'delayed' then
    redis.call('ZREM', dkey, a)
    redis.call('HDEL', bodies, a)
    redis.call('HDEL', store, 'd:' .. a)
    if fair then redis.call('HDEL', fair, 'd:' .. a) end  -- its group, on a fair queue
  elseif state == 'staged' then
    redis.call('HDEL', fair, a)
    if redis.call('HINCRBY', fair, 'n', -1) <= 0 then redis.call('HDEL', fair, 'n') end
    redis.call('HDEL', store, 'g:' .. a)
  elseif state == 'ready' then
    redis.call('XDEL', a, b)
  end
end

-- Record that KEY is held by the message just stored: at LEVEL as entry ID, delayed as
-- MEMBER, or staged as FIELD of the staging hash (the other two nil); TTL the x-unique-ttl
-- in force (ms). OLD is the reference it replaces (a stale one, or a replaced message's),
-- whose reverse field goes.
local function unique_hold(store, key, ttl, level, id, member, old, field)
  local kind, _, m = unique_parse(old or 't:0')
  if (kind == 'd' and m ~= member) or (kind == 'g' and m ~= field) then
    redis.call('HDEL', store, kind .. ':' .. m)
  end
  if id then
    redis.call('HSET', store, 'k:' .. key, 's:' .. ttl .. ':' .. level .. ':' .. id)
  elseif member then
    redis.call('HSET', store, 'k:' .. key, 'd:' .. ttl .. ':' .. member, 'd:' .. member, key)
  else
    redis.call('HSET', store, 'k:' .. key, 'g:' .. ttl .. ':' .. field, 'g:' .. field, key)
  end
end

-- Release the keys of ITEMS ({key, level, entry id} each), messages the caller settled:
-- each key whose STORE field still names that entry (at most one message holds a key, so a
-- stale settle, or a key since taken by another message, releases nothing). A delayed
-- message's reference ("d:") is never released by a settle: a read that moves a delayed
-- message to its stream names the new entry in the same call (unique_moved), so a "d:"
-- one is another message, still waiting (one redriven by hand without its key carries it
-- without holding it: lua/redrive.lua). CLOCK: the settle is an ack and CLOCK() the time in
-- unix ms, asked only for a key with x-unique-ttl, which stays until then + ttl (throttle);
-- nil: a dead letter, every key goes at once. One HMGET, one HDEL and one HSET per 1,000
-- keys (ack.lua, the acks riding in a read, deadletter.lua). Returns the number released.
local function unique_release(store, items, clock)
  local released, now = 0, nil
  for first = 1, #items, 1000 do  -- unpack() has a limit
    local last = math.min(first + 999, #items)
    local fields = {}
    for j = first, last do fields[#fields + 1] = 'k:' .. items[j][1] end
    local refs = redis.call('HMGET', store, unpack(fields))
    local gone, set = {}, {}
    for j = first, last do
      local ref, item = refs[j - first + 1], items[j]
      local kind, ttl, a, b = nil, nil, nil, nil
      if ref then kind, ttl, a, b = unique_parse(ref) end
      if kind == 's' and a == item[2] and b == item[3] then
        released = released + 1
        if clock and ttl and ttl > 0 then
          now = now or clock()
          set[#set + 1] = 'k:' .. item[1]
          set[#set + 1] = 't:' .. string.format('%d', now + ttl)
        else
          gone[#gone + 1] = 'k:' .. item[1]
        end
      end
    end
    if #gone > 0 then redis.call('HDEL', store, unpack(gone)) end
    if #set > 0 then redis.call('HSET', store, unpack(set)) end
  end
  return released
end

-- Release the key of a waiting message a purge deleted: KIND 'd', delayed MEMBER NAME, or
-- 'g', the staged message at field NAME of the staging hash. 1 if it had one.
local function unique_release_waiting(store, kind, name)
  local key = redis.call('HGET', store, kind .. ':' .. name)
  if not key then return 0 end
  redis.call('HDEL', store, kind .. ':' .. name)
  local ref = redis.call('HGET', store, 'k:' .. key)
  local k, _, m = unique_parse(ref or 't:0')
  if k == kind and m == name then redis.call('HDEL', store, 'k:' .. key) end
  return 1
end

-- Whether STORE holds keys at all, checked before a read moves any due delayed message (types
-- first): (false) none, so nothing to re-point and no command more; (true) a hash; or
-- (nil, error) another type. One command (TYPE) per call that has due messages to move.
local function unique_store(store)
  local t = redis.call('TYPE', store)['ok']
  if t == 'none' then return false, nil end
  if t ~= 'hash' then return nil, 'WRONGTYPE ' .. store .. ' holds a ' .. t .. ', not a hash' end
  return true, nil
end

-- Re-point the keys of waiting messages a read just moved (MOVED: {name, stream key, new
-- entry id} each, with KIND 'd': delayed members lua/lib/delay.lua's promote appended to
-- their streams, or 'g': staged fields lua/lib/fair.lua's fair_move appended; or {name, nil,
-- staging field} with KIND 'd': delayed members promote staged in their group): field
-- k:<key> then names the entry, "s:<ttl>:<level>:<id>", as a publish's would (or the staged
-- message, "g:<ttl>:<field>", with its reverse field), so the key stays held while the
-- message is ready or in flight; the reverse field <kind>:<name> goes. Only names with a
-- reverse field (one HMGET for all): a message without a key costs nothing more.
local function unique_moved(store, moved, kind)
  if #moved == 0 then return end
  local fields = {}
  for j, p in ipairs(moved) do fields[j] = kind .. ':' .. p[1] end
  local keys = redis.call('HMGET', store, unpack(fields))
  local set, gone = {}, {}
  for j, p in ipairs(moved) do
    local key = keys[j]
    if key then
      gone[#gone + 1] = fields[j]
      local k, ttl, name = unique_parse(redis.call('HGET', store, 'k:' .. key) or 't:0')
      if k == kind and name == p[1] then  -- else the key went to another message since
        local n = #set
        if p[2] then
          set[n + 1], set[n + 2] = 'k:' .. key, 's:' .. (ttl or 0) .. ':' ..
                                   (string.match(p[2], ':(%d+)$') or '0') .. ':' .. p[3]
        else
          set[n + 1], set[n + 2] = 'k:' .. key, 'g:' .. (ttl or 0) .. ':' .. p[3]
          set[n + 3], set[n + 4] = 'g:' .. p[3], key
        end
      end
    end
  end
  if #gone > 0 then redis.call('HDEL', store, unpack(gone)) end
  if #set > 0 then redis.call('HSET', store, unpack(set)) end
end

-- Count a keyed publish that stored a message in STORE's field UNIQUE_TICK (an HINCRBY):
-- the count, nil when the field holds no number. At UNIQUE_EVERY (or nil) the caller runs
-- the sweep (lua/lib/unique_sweep.lua), which starts the count again; at 1 the store is new
-- (or the count began again), and the caller sees to its expiry.
local UNIQUE_TICK, UNIQUE_EVERY = 't', 16
local function unique_count(store)
  return (try('HINCRBY', store, UNIQUE_TICK, 1))
end
