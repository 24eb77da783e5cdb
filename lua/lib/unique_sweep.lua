-- The sweep of the unique key store (a library, included after common, unique and fair):
-- the fields of messages gone without releasing their key are deleted, a bounded step at a
-- time, in the keyed publishes that store a message (publish.lua). Apart from
-- lua/lib/unique.lua because only one keyed publish in 16 steps or looks: built with it,
-- it was five closures more in every keyed publish. Why it is correct and what it costs:
-- docs/design.rst, "Unique keys".
-- KEYS: none of its own. The caller passes the store, its streams (LEVELS: level -> stream),
-- the delayed set and the staging hash, which it has in its KEYS with the queue's tag. The
-- store's fields it keeps are listed in lua/lib/unique.lua.
--
--@lazy: built only when a call needs it; callers write lib_unique_sweep().unique_sweep(...)
-- (kombu_streams/flatten.py).

-- The sweep of fields that outlived their message (docs/design.rst, "Unique keys": an expiry or
-- delivery limit at read, drop-head, a purged ready entry, a cancelled delayed message leave
-- theirs; the key already counts as free, only memory is at stake).
-- When: each keyed publish that stores a message counts itself in field UNIQUE_TICK (an
-- HINCRBY: unique_count, lua/lib/unique.lua), and every UNIQUE_EVERY-th one calls
-- unique_sweep, which starts the count again and either runs a step of the cycle under way, or
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
-- with no cycle under way, the room (an HLEN of the store, an XLEN per level, an HLEN of
-- BODIES, with x-fairness an HGET) and an HSET; per step, one to four HSCANs (about COUNT
-- fields each of a hashtable, all of a listpack), up to 2 x UNIQUE_LOOKS looks (XINFO
-- GROUPS once per level, an XPENDING or two hash commands per field, and an XRANGE of one
-- entry per level), an HDEL per reply and an HSET. LEVELS maps a level to its stream, DKEY
-- is the delayed set and BODIES the delayed messages' hash, CLOCK() unix ms,
-- GROUP the queue's group, FAIR the staging hash of a fair queue (a staged message's look is
-- an HEXISTS there; nil: staged ones are left alone).
-- Never fails: it runs after the message was stored, so a key of another type at one of the
-- names is only skipped (try), and the store is a hash (the publish just wrote it).
local UNIQUE_CURSOR, UNIQUE_AT = 'c', 'a'
local UNIQUE_LOOKS, UNIQUE_SLACK = 32, 32

-- The fields the queue's messages can hold live: two for each message it holds (a key, and a
-- delayed or staged message's reverse field), whether it has a key or not, counted as a
-- length limit counts them (held_count, lua/lib/limits.lua: its streams' entries and the
-- delayed messages' hash BODIES) plus the staged ones. LEVELS, FAIR as unique_sweep's; a key
-- of another type counts nothing (then a cycle starts sooner: sweeping, never a loss).
local function unique_room(levels, bodies, fair)
  local streams = {}
  for _, stream in pairs(levels) do streams[#streams + 1] = stream end
  local n = held_count(streams, bodies) or 0
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
    local ref = redis.call('HGET', store, 'k:' .. v) or 't:0'
    local kind, _, m = lib_unique().unique_parse(ref)
    if kind == string.sub(rev, 1, 1) and m == name then return f, 'k:' .. v end
    return f
  end
  if string.sub(f, 1, 2) ~= 'k:' then return nil end  -- the count, the cursor
  local kind, a, b, c = lib_unique().unique_parse(v)
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

local function unique_sweep(store, levels, dkey, bodies, clock, group, fair)
  local at = redis.call('HMGET', store, UNIQUE_CURSOR, UNIQUE_AT)
  local cursor, skip = string.match(at[1] or '', '^(%d+):(%d+)$')
  cursor, skip = cursor or '0', tonumber(skip) or 0
  if (at[1] or '') == ''  -- no cycle under way: one starts only over the room
     and redis.call('HLEN', store) <= UNIQUE_SLACK + unique_room(levels, bodies, fair) then
    redis.call('HSET', store, UNIQUE_TICK, 0)
    return
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
end
