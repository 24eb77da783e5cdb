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
--                    stepped or looked (unique_sweep below)
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

-- The sweep of fields that outlived their message (docs/design.rst, "Unique keys": an expiry or
-- delivery limit at read, drop-head, a purged ready entry, a cancelled delayed message leave
-- theirs; the key already counts as free, only memory is at stake).
-- When: each keyed publish that stores a message counts itself in field UNIQUE_TICK (an
-- HINCRBY), and every UNIQUE_EVERY-th one either runs a step of the cycle under way, or
-- starts a cycle only if the store holds more than UNIQUE_SLACK fields beyond the room its
-- messages can take (unique_room: two fields for each message the queue holds). So a store
-- whose messages end through acks, dead letters or replace mode, which release their keys,
-- is never scanned: before 2026-12-08 every 16th keyed publish ran a step whatever the store
-- held, 2.5 fields looked at per publish. (Keys an ack keeps throttled, x-unique-ttl, are
-- fields the room does not count: over 32 of them, cycles run one after the other.) A cycle
-- once started runs to its end (UNIQUE_CURSOR "" again, or absent): the room is a count of
-- messages, not of live keys, so it only says when there may be garbage, and a cycle
-- stopped half-way would leave what it had not reached.
-- A step: an HSCAN (COUNT UNIQUE_LOOKS + 8: the sweep's own fields and a reply's unevenness
-- leave one of stream entries' fields its weight) of STORE from the cursor in UNIQUE_CURSOR
-- ("<cursor>:<offset>"), resumed at the field named in UNIQUE_AT (the first one not looked at
-- yet: a reply can hold more fields than a step looks at, and fields deleted meanwhile, by
-- acks, shift an offset; the offset is the fallback when that field is gone). It looks at
-- the rest of the reply, at most 2 x UNIQUE_LOOKS fields (a ZSCORE, or the clock for a
-- throttle, or for a stream entry XINFO GROUPS once per stream and an XPENDING of its id if
-- it was delivered), those whose message is gone deleted with their pair; while it has
-- passed less than UNIQUE_LOOKS of weight (below) and the cycle goes on, it takes the next
-- reply, at most four in all. An entry not delivered yet is not read (an XRANGE of
-- it would copy it): purge and drop-head delete ready entries from the front, so one before the
-- first ready entry left, or with none left, is gone (one XRANGE of one entry per stream and
-- step tells); one deleted from the middle (an XDEL behind our back) keeps its field, memory
-- only, until the group reads past its id, when the PEL tells. Why every n-th: while the hash
-- is a listpack (up to hash-max-listpack-entries fields, 512 by default;
-- hash-max-ziplist-entries on 6.2) HSCAN ignores COUNT and returns the whole hash, so a step
-- per publish copied up to 1,024 strings into Lua each time; now one publish in UNIQUE_EVERY
-- pays it. Why the whole reply: a hashtable's reply holds about COUNT fields, and a step that
-- stopped short of its end fetched the same reply again the next time (copied into Lua twice).
-- The bound: weigh a field that names a stream entry 1 and any other 1/2. A step passes at
-- least UNIQUE_LOOKS = 2 x UNIQUE_EVERY of weight (unless the cycle ends, or four replies of
-- a hashtable, each of about COUNT fields, hold less), so 2 per keyed publish, and a keyed
-- publish adds at most 1 (its entry's field, or a delayed message's two); so a cycle over a
-- store of weight W takes at most about W / 2 keyed publishes, which add at most W / 2; every
-- field stale when a cycle starts is gone when it ends. With no cycle under way the store
-- holds at most UNIQUE_SLACK fields more than twice the queue's messages (and what the
-- publishes since the last count added); during one, at most about twice that. Fields of
-- entries deleted from the middle of the ready ones behind our back stay until the group
-- reads past them. Cost per keyed publish: an HINCRBY; every UNIQUE_EVERY-th, an HMGET and,
-- with no cycle under way, the room (an HLEN, an XLEN per level, a ZCARD, with x-fairness an
-- HGET) and an HSET; per step, one to four HSCANs (about COUNT fields each of a hashtable,
-- all of a listpack), up to 2 x UNIQUE_LOOKS looks (XINFO GROUPS once per level, an XPENDING
-- or two hash commands per field, and an XRANGE of one entry per level), an HDEL per reply
-- and an HSET. LEVELS maps a level to its stream, DKEY is the delayed set, CLOCK() unix ms,
-- GROUP the queue's group, FAIR the staging hash of a fair queue (a staged message's look is
-- an HEXISTS there; nil: staged ones are left alone). Returns the count: 1 when the store is
-- new (or a count began again after a step): the caller then sees to its expiry.
-- Never fails: it runs after the message was stored, so a key of another type at one of the
-- names is only skipped (try), and the store is a hash (the publish just wrote it).
local UNIQUE_CURSOR, UNIQUE_AT, UNIQUE_TICK = 'c', 'a', 't'
local UNIQUE_EVERY, UNIQUE_LOOKS, UNIQUE_SLACK = 16, 32, 32

-- The fields the queue's messages can hold live: two for each message it holds (a key, and a
-- delayed or staged message's reverse field), whether it has a key or not. LEVELS, DKEY, FAIR
-- as unique_sweep's; a key of another type counts nothing.
local function unique_room(levels, dkey, fair)
  local n = try('ZCARD', dkey) or 0
  for _, stream in pairs(levels) do n = n + (try('XLEN', stream) or 0) end
  if fair then
    local staged = try('HGET', fair, FAIR_COUNT)  -- (try's error, if any, not to tonumber)
    n = n + (tonumber(staged) or 0)
  end
  return 2 * n
end

-- Whether staged field NAME of STEP.fair (the staging hash, nil when the caller has none:
-- then it counts as there) is there, or nil on another type.
local function unique_staged(step, name)
  if not step.fair then return true end
  local r, err = try('HEXISTS', step.fair, name)
  if err then return nil end
  return r == 1
end

-- Whether field F of the store, naming entry C (id C, parsed as CMS, CSEQ) of the stream at
-- LEVEL, outlived it: F when it did, else nil (see unique_sweep below for the looks).
local function unique_entry_gone(f, level, c, cms, cseq, levels, group, step)
  local stream = levels[level or '']
  if not stream then return f end  -- a level the queue no longer has: free already
  if not cms then return f end  -- names no entry: not a field of ours, free
  local last = step.last[stream]  -- the group's last-delivered id: {ms, seq, id}
  if last == nil then
    local ok, got = pcall(last_delivered, stream, group)  -- no stream: nothing delivered
    got = ok and got or '0-0'
    local lms, lseq = id_parts(got)
    last = {lms or 0, lseq or 0, got}
    step.last[stream] = last
  end
  if cms < last[1] or (cms == last[1] and cseq <= last[2]) then
    -- Delivered and not settled (or parked): in the PEL. Delivered and no longer there:
    -- settled, and every settle deletes its entry. Neither asks for the entry itself. (An
    -- entry after the group's last-delivered id was never delivered: no PEL look.)
    local p, err = try('XPENDING', stream, group, c, c, 1)
    if err then return nil end
    if p and p[1] then return nil end
    return f
  end
  -- Not delivered yet. Purge and drop-head delete ready entries from the front (the oldest
  -- after the group's last-delivered id), so one before the first ready entry left (or with
  -- none left) is gone: one XRANGE of one entry per stream and step tells, not a copy of
  -- each. One deleted from the middle (an XDEL behind our back) keeps its field until the
  -- group reads past its id, when the look above (the PEL) tells.
  local ready = step.ready[stream]  -- the first ready id as {ms, seq}; '': not a stream
  if ready == nil then
    local r, err = try('XRANGE', stream, '(' .. last[3], '+', 'COUNT', 1)
    if err then
      ready = ''
    else
      ready = false
      if r[1] then
        local rms, rseq = id_parts(r[1][1])
        ready = rms and {rms, rseq} or ''  -- (a real stream's ids always parse)
      end
    end
    step.ready[stream] = ready
  end
  if ready == false then return f end
  if ready ~= '' and (cms < ready[1] or (cms == ready[1] and cseq < ready[2])) then return f end
  return nil
end

local function unique_gone(store, f, v, levels, dkey, clock, group, step)
  -- most fields name a stream entry: one match takes its level and id ("ms-seq")
  local level, c, ms, seq = string.match(v, '^s:%d+:(%d+):((%d+)%-(%d+))$')
  if level and string.sub(f, 1, 2) == 'k:' then
    return unique_entry_gone(f, level, c, tonumber(ms), tonumber(seq), levels, group, step)
  end
  local rev = string.sub(f, 1, 2)
  if rev == 'd:' or rev == 'g:' then  -- reverse field: its delayed or staged message gone?
    local name, there = string.sub(f, 3), nil
    if rev == 'd:' then
      local score, err = try('ZSCORE', dkey, name)
      there = err or score
    else
      there = unique_staged(step, name) ~= false
    end
    if there then return nil end
    local kind, _, m = unique_parse(redis.call('HGET', store, 'k:' .. v) or 't:0')
    if kind == string.sub(rev, 1, 1) and m == name then return f, 'k:' .. v end
    return f
  end
  if string.sub(f, 1, 2) ~= 'k:' then return nil end  -- the count, the cursor
  local kind, a, b, c = unique_parse(v)
  if kind == 't' then
    if a and a > clock() then return nil end
    return f
  end
  if kind == 'd' then
    local score, err = try('ZSCORE', dkey, b)
    if err or score then return nil end
    return f, 'd:' .. b
  end
  if kind == 'g' then
    local there = unique_staged(step, b)
    if there == nil or (there and redis.call('HGET', store, 'g:' .. b) == string.sub(f, 3)) then
      return nil
    end
    return f
  end
  if kind ~= 's' then return nil end
  local cms, cseq = id_parts(c or '')
  return unique_entry_gone(f, b, c, cms, cseq, levels, group, step)
end

local function unique_sweep(store, levels, dkey, clock, group, fair)
  local tick = try('HINCRBY', store, UNIQUE_TICK, 1)
  if tick and tick < UNIQUE_EVERY then return tick end  -- (not a number: reset below)
  local at = redis.call('HMGET', store, UNIQUE_CURSOR, UNIQUE_AT)
  local cursor, skip = string.match(at[1] or '', '^(%d+):(%d+)$')
  cursor, skip = cursor or '0', tonumber(skip) or 0
  if (at[1] or '') == ''  -- no cycle under way: one starts only over the room
     and redis.call('HLEN', store) <= UNIQUE_SLACK + unique_room(levels, dkey, fair) then
    redis.call('HSET', store, UNIQUE_TICK, 0)
    return tick
  end
  local state = {last = {}, ready = {}, fair = fair}  -- per stream: last-delivered, first
  -- ready id; the staging hash (staged messages' fields are looked at there)
  local weight, looked, scans = 0, 0, 0  -- weight passed: 1 a stream entry's field, 1/2
  -- any other; fields passed (at most 2 x UNIQUE_LOOKS a step); HSCANs
  local step, flat, n, last, freed
  while true do
    step = redis.call('HSCAN', store, cursor, 'COUNT', UNIQUE_LOOKS + 8)  -- + c, a, t
    scans = scans + 1
    flat, n = step[2], #step[2] / 2
    if scans == 1 and at[2] and at[2] ~= '' and flat[2 * skip + 1] ~= at[2] then
      -- the field to resume at moved: fields before it were deleted, so it can only be
      -- earlier; found later, it was deleted and added again (at a listpack's end): the
      -- offset then, which may look at a few fields twice but passes over none
      for j = 0, math.min(skip, n - 1) do
        if flat[2 * j + 1] == at[2] then
          skip = j
          break
        end
      end
    end
    local gone, dropped = {}, {}
    last, freed = skip, 0  -- freed: of this reply's fields looked at
    while last < n and looked < 2 * UNIQUE_LOOKS do  -- the whole reply, within the cap
      local f, v = flat[2 * last + 1], flat[2 * last + 2]
      local entry = string.sub(f, 1, 2) == 'k:' and string.sub(v, 1, 2) == 's:'
      weight, looked = weight + (entry and 1 or 0.5), looked + 1
      local f1, f2 = nil, nil
      if not dropped[f] then
        f1, f2 = unique_gone(store, f, v, levels, dkey, clock, group, state)
      end
      last = last + 1
      if dropped[f] then  -- the pair of one looked at before
        freed = freed + 1
      else
        if f1 then
          gone[#gone + 1], dropped[f1] = f1, true
          freed = freed + 1
        end
        if f2 then gone[#gone + 1], dropped[f2] = f2, true end
      end
    end
    if #gone > 0 then redis.call('HDEL', store, unpack(gone)) end
    while last < n and dropped[flat[2 * last + 1]] do  -- the next field went as a pair
      last, freed = last + 1, freed + 1
    end
    -- owed: UNIQUE_LOOKS of weight; another reply only while this one is done, the cycle
    -- is not, and (a hashtable's replies hold COUNT fields or more) at most four in all
    if last < n or weight >= UNIQUE_LOOKS or step[1] == '0' or scans >= 4 then break end
    cursor, skip = step[1], 0
  end
  if last < n then  -- the same reply again next time, from its field flat[2 * last + 1]
    redis.call('HSET', store, UNIQUE_CURSOR, cursor .. ':' .. (last - freed),
               UNIQUE_AT, flat[2 * last + 1], UNIQUE_TICK, 0)
  else  -- the next reply; none when the cursor is back at 0: the cycle ended
    redis.call('HSET', store, UNIQUE_CURSOR, step[1] == '0' and '' or step[1] .. ':0',
               UNIQUE_AT, '', UNIQUE_TICK, 0)
  end
  return tick
end
