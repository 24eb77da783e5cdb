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
--                  prefix, "r:<token>" for a big message); one holding a unique key is
--                  named by the key store (lua/lib/unique.lua); one x-unique-mode replace
--                  dropped leaves a gap in its group's sequence, passed over by fair_pop
--   d:<member>     the group of a delayed message (publish.lua), staged when a read moves it
--   f:G            with x-group-max-in-flight: the moves of group G that may hold its slots,
--                  "<count>[*] <level>:<entry id> ..." (* while G waits in the FIFO below)
--   zh, zt, z:<n>  the FIFO of groups that ran dry holding slots (fair_gate)
-- Every operation is O(1) commands per message staged or moved, whatever the number of
-- groups: the rotation is a linked list, never scanned (the per-group cap's looks are
-- bounded per call: fair_gate).
--
--@lazy: built only when a call needs it; callers write lib_fair().helper(...)
-- (kombu_streams/flatten.py).

local FAIR = 'g:'  -- ready index member prefix: level stream <key>'s staging may hold messages
local FAIR_COUNT = 'n'

-- The level of a level stream's key: the number that ends its name.
local function fair_level(stream)
  return string.match(stream, ':(%d+)$') or '0'
end

-- Stage VALUE (a delayed value: lua/lib/delay.lua's with_deadline) for GROUP at LEVEL in the
-- staging hash FAIR_KEY; a group that had nothing staged (no tail field: a group that ran dry
-- lost its fields) joins the rotation as its tail, so it is served after every group already
-- waiting. The first write, an HINCRBY, fails alone on another type. Returns (created, nil,
-- field): created when its count was 0 (the hash is new, or held delayed messages' groups
-- only: it gets the queue's expiry either way), field the message's m:L:G:<seq> (a unique
-- key's store names it: lua/lib/unique.lua); or (nil, error).
local function fair_stage(fair_key, level, group, value)
  local count, err = try('HINCRBY', fair_key, FAIR_COUNT, 1)
  if err then return nil, err end
  local tail = redis.call('HINCRBY', fair_key, 't:' .. level .. ':' .. group, 1)
  local field = 'm:' .. level .. ':' .. group .. ':' .. tail
  redis.call('HSET', fair_key, field, value)
  if tail == 1 then  -- it was dry: it joins the rotation, last
    local last = redis.call('HGET', fair_key, 'c:' .. level)
    if last then
      local after = redis.call('HGET', fair_key, 'x:' .. level .. ':' .. last)
      redis.call('HSET', fair_key, 'x:' .. level .. ':' .. group, after,
                 'x:' .. level .. ':' .. last, group, 'c:' .. level, group)
    else
      redis.call('HSET', fair_key, 'x:' .. level .. ':' .. group, group, 'c:' .. level, group)
    end
  end
  return count == 1, nil, field
end

-- The per-group cap of one read call (x-group-max-in-flight MAX, docs/design.rst "Fair
-- share"): a group may have at most MAX messages the rotation moved into the queue's
-- streams and not settled yet (delivered and not acked, parked again after a requeue,
-- reclaim or retry, or moved and not read yet). Counted, not kept: field f:<group> of the
-- staging hash FAIR_KEY lists the moves, "<count> <level>:<entry id> ...", oldest first
-- (the count read without the list, the list read from its front only as far as a look
-- goes), and a move is charged while its entry is still in its stream (LEVELS maps a level
-- to it): pending in GROUP's PEL, or moved and not read yet. Every settle (ack, dead
-- letter, expiry, purge) deletes its entry, so it frees the slot without writing here, and
-- no count can drift. A list is looked at when it would stop a group (room) or keep a dry
-- one in the rotation (idle), oldest first, at most FAIR_LOOKS moves per call (an XPENDING
-- of one id each, and an XRANGE of one id for one not pending), and at its front when it
-- grew (flush: at most FAIR_TRIM looks per call); moves found settled leave it. Turns pass
-- at most FAIR_SKIPS times per call.
local FAIR_LOOKS, FAIR_SKIPS, FAIR_TRIM, FAIR_KEEP = 64, 32, 128, 64

local function fair_gate(fair_key, max, levels, group, stream)
  local lists, dirty, pending, order, seen = {}, {}, {}, {}, {}  -- pending: g -> new moves
  local looks, trims, aged, passes = 0, 0, false, 0
  local gate = {}
  -- A turn passes: false once FAIR_SKIPS passed since the last gate.level() (each level
  -- of a call has its own budget: passes at one level never stop another's).
  function gate.pass()
    passes = passes + 1
    return passes <= FAIR_SKIPS
  end
  function gate.level()
    passes = 0
  end
  -- G's list as stored, "<count>[*] <move> <move> ..." (* while G waits in the FIFO of dry
  -- groups), kept as {n = count, q = queued, s = the moves}: counted without reading the
  -- moves, which are read one by one from the front only as far as a look goes, and cut or
  -- appended as strings (no parse of the whole list).
  local function load(g)
    if lists[g] == nil then
      local v = redis.call('HGET', fair_key, 'f:' .. g) or ''
      local space = string.find(v, ' ', 1, true)  -- no pattern over the whole list
      local head = space and string.sub(v, 1, space - 1) or ''
      local queued = string.sub(head, -1) == '*'
      if queued then head = string.sub(head, 1, -2) end
      lists[g] = {n = tonumber(head) or 0, q = queued, s = space and string.sub(v, space + 1) or ''}
    end
    return lists[g]
  end
  -- Whether move R still holds a slot: its entry is still in its stream (every settle
  -- deletes it). Pending ones answer the XPENDING (a short reply); the others the XRANGE,
  -- which copies only an entry moved and not read yet (a settled one is gone). SETTLED:
  -- R is likely settled (an old move): the XRANGE alone answers that.
  local function charged(r, settled)
    local lv, id = string.match(r, '^(%d+):(.+)$')
    local s = lv and levels[lv]
    if not s then return false end  -- a level the queue no longer has
    if not settled then
      local p = try('XPENDING', s, group, id, id, 1)
      if p and p[1] then return true end
    end
    local e = try('XRANGE', s, id, id)
    return e ~= nil and e[1] ~= nil
  end
  -- Look at up to LIMIT of G's moves from the front (at most WANT found settled, nil: no
  -- such bound), each a look of the turns' budget (FAIR_LOOKS), or of housekeeping's
  -- (FAIR_TRIM) when HOUSE, which stops at its second charged one (it copies those):
  -- settled ones leave the list, charged ones go to its end, so the next look meets
  -- others (a long task at the front hides nothing behind it).
  local function walk(g, limit, want, house)
    local list = load(g)
    local back, freed, at, k = {}, 0, 1, 0
    while at <= #list.s and k < limit and not (want and freed >= want)
          and not (house and #back >= 2) do
      if house then
        if trims >= FAIR_TRIM then break end
        trims = trims + 1
      else
        if looks >= FAIR_LOOKS then break end
        looks = looks + 1
      end
      local stop = string.find(list.s, ' ', at, true) or #list.s + 1
      local r = string.sub(list.s, at, stop - 1)
      k, at = k + 1, stop + 1
      if charged(r, house) then back[#back + 1] = r else freed = freed + 1 end
    end
    if k > 0 then
      local parts, rest = {}, string.sub(list.s, at)
      if rest ~= '' then parts[1] = rest end
      if #back > 0 then parts[#parts + 1] = table.concat(back, ' ') end
      list.s, list.n, dirty[g] = table.concat(parts, ' '), list.n - freed, true
    end
  end
  -- Whether G may give one more, having given TOOK in the plan being made: at the cap, its
  -- moves are looked at (once per call) until enough are found settled, or the looks run
  -- out (a move not looked at counts as charged).
  function gate.room(g, took)
    local list = load(g)
    if list.n + took < max then return true end
    if not seen[g] then
      seen[g] = true
      walk(g, list.n, list.n + took - max + 1, false)
    end
    return list.n + took < max
  end
  -- A message of group G at level LEVEL moved as entry ID.
  function gate.moved(g, level, id)
    local moves = pending[g]
    if not moves then
      moves = {}
      pending[g], order[#order + 1] = moves, g
    end
    moves[#moves + 1] = level .. ':' .. id
  end
  -- Whether group G is in the rotation of a level (its tail field t:<level>:<group>).
  local function turning(g)
    local fields = {}
    for lv in pairs(levels) do fields[#fields + 1] = 't:' .. lv .. ':' .. g end
    for _, t in ipairs(redis.call('HMGET', fair_key, unpack(fields))) do
      if t then return true end
    end
    return false
  end
  -- Groups that ran dry (DRIED) leave the rotation holding slots: their lists stay until
  -- settled, so a group that comes back is still capped. Each waits once (its list marked)
  -- in a FIFO in the staging hash (fields zh, zt, z:<n>). Once it holds more than
  -- FAIR_KEEP, a call that dries k groups looks at its k + 1 oldest: one back in a rotation
  -- leaves the FIFO (its turns look after its list), one whose moves are all settled leaves
  -- it with its list, others go to its end. So the FIFO holds each group at most once, and
  -- it and the lists stay near the groups with messages out.
  local function tend(dried)
    local ht = redis.call('HMGET', fair_key, 'zh', 'zt')
    local h, t = tonumber(ht[1]) or 0, tonumber(ht[2]) or 0
    local sets = {}
    for _, g in ipairs(dried) do
      local list = load(g)
      if list.n > 0 and not list.q then
        t, list.q, dirty[g] = t + 1, true, true
        sets[#sets + 1], sets[#sets + 2] = 'z:' .. t, g
      end
    end
    if t - h > FAIR_KEEP then
      local fields = {}
      for n = h + 1, h + math.min(#dried + 1, t - h) do fields[#fields + 1] = 'z:' .. n end
      local names = {}
      for n = 1, #fields, 1000 do  -- in the sets just made, or in the hash
        local got = redis.call('HMGET', fair_key, unpack(fields, n, math.min(n + 999, #fields)))
        for k, v in ipairs(got) do names[n + k - 1] = v end
      end
      local pushed = {}
      for k = 1, #sets, 2 do pushed[sets[k]] = sets[k + 1] end
      for k, f in ipairs(fields) do
        local g = names[k] or pushed[f]
        if g then
          local list, back = load(g), turning(g)
          if not back then walk(g, list.n, nil, true) end
          if list.n > 0 and not back then
            t = t + 1
            sets[#sets + 1], sets[#sets + 2] = 'z:' .. t, g
          else
            list.q, dirty[g] = false, true
          end
        end
      end
      chunked('HDEL', fair_key, fields)
      h = h + #fields
    end
    local keep = {}  -- pushed and not taken back off by the tending above
    for k = 1, #sets, 2 do
      if tonumber(string.sub(sets[k], 3)) > h then
        keep[#keep + 1], keep[#keep + 2] = sets[k], sets[k + 1]
      end
    end
    chunked('HSET', fair_key, keep)
    if h >= t then
      redis.call('HDEL', fair_key, 'zh', 'zt')
    else
      redis.call('HSET', fair_key, 'zh', h, 'zt', t)
    end
  end
  -- Charge what was moved, queue the groups that ran dry (DRIED, from the plan: tend), and
  -- write the lists that changed (an HSET and an HDEL per 1,000). A list that grew by k is
  -- looked at first: up to k + 1 of its oldest moves, the settled ones dropped, the others
  -- sent to its end, so with messages settled about in the order they went out it stays
  -- near what the group has in flight, not at its cap, and so does its string. The staging
  -- hash, which the plan's save may have emptied, gets the queue's expiry back (STREAM's).
  function gate.flush(dried)
    local grew, grown = pending, order
    pending, order = {}, {}
    for _, g in ipairs(grown) do
      local list, moves = load(g), grew[g]
      local old = math.min(list.n, #moves + 1)  -- looked at: old moves only
      local added = table.concat(moves, ' ')
      list.s = list.s == '' and added or list.s .. ' ' .. added
      list.n, dirty[g] = list.n + #moves, true
      walk(g, old, nil, true)
    end
    if dried and #dried > 0 then tend(dried) end
    local sets, drops = {}, {}
    for g in pairs(dirty) do
      local list = lists[g]
      if list.n > 0 then
        sets[#sets + 1] = 'f:' .. g
        sets[#sets + 1] = list.n .. (list.q and '*' or '') .. ' ' .. list.s
      else
        drops[#drops + 1] = 'f:' .. g
      end
    end
    dirty = {}
    chunked('HDEL', fair_key, drops)
    chunked('HSET', fair_key, sets)
    if not aged and #sets > 0 then
      aged = true
      if redis.call('PTTL', fair_key) == -1 then expire_as(fair_key, stream) end
    end
  end
  return gate
end

-- The rotation of level LEVEL after taking N staged messages off their groups' FIFOs, one
-- per group per turn: the group after the tail gives its oldest one and becomes the tail, or
-- leaves the rotation when it ran dry. Reads the hash only through CACHE (links, heads and
-- tails, each read once per call), so planning again for fewer costs no command. GATE,
-- optional (fair_gate: x-group-max-in-flight): a group at its cap lets its turn pass (it
-- becomes the tail, giving nothing); after GATE's skip budget, or a whole turn of passes,
-- the plan stops (blocked). Returns the plan: order (the
-- message fields, in taking order), head, relinked, dry, last, done, blocked.
local function fair_plan(fair_key, level, n, last, cache, gate)
  local pre = level .. ':'
  local nxt, head, relinked, dry, order, took, groups = {}, {}, {}, {}, {}, {}, {}
  local function next_of(g)
    if nxt[g] == nil then
      if cache.x[g] == nil then cache.x[g] = redis.call('HGET', fair_key, 'x:' .. pre .. g) end
      nxt[g] = cache.x[g]
    end
    return nxt[g]
  end
  local function unlink(g)  -- out of the rotation (its predecessor LAST stays the tail)
    dry[#dry + 1] = g
    local after = next_of(g)
    if after == g then return true end  -- it was the only one
    nxt[last], relinked[last] = after, true
    return false
  end
  local done, blocked, since = false, false, nil  -- since: the first of a run of passes
  while #order < n do
    local g = next_of(last)
    if cache.h[g] == nil then
      local ht = redis.call('HMGET', fair_key, 'h:' .. pre .. g, 't:' .. pre .. g)
      cache.h[g], cache.t[g] = tonumber(ht[1]) or 0, tonumber(ht[2]) or 0
    end
    local seq = (head[g] or cache.h[g]) + 1
    local staged = seq <= cache.t[g]
    if staged and gate and not gate.room(g, took[g] or 0) then
      if since == g or not gate.pass() then  -- at its cap: its turn passes
        blocked = true
        break
      end
      since, last = since or g, g
    elseif staged then
      since, took[g] = nil, (took[g] or 0) + 1
      order[#order + 1], head[g], groups[#order + 1] = 'm:' .. pre .. g .. ':' .. seq, seq, g
      if seq < cache.t[g] then  -- the group has more: it becomes the tail
        last = g
      elseif unlink(g) then
        done = true
        break
      end
    else  -- nothing staged (a gap was its last): dry
      since = nil
      if unlink(g) then
        done = true
        break
      end
    end
  end
  return {order = order, groups = groups, head = head, relinked = relinked, nxt = nxt,
          dry = dry, last = last, done = done, blocked = blocked}
end

-- Write PLAN (fair_plan) back to FAIR_KEY for level LEVEL, TAKEN of its messages removed:
-- heads, links and the tail in one HSET, the dry groups' fields in one HDEL.
local function fair_save(fair_key, level, plan, taken)
  local pre = level .. ':'
  chunked('HDEL', fair_key, plan.order)  -- a field gone already is no matter
  if taken > 0 and redis.call('HINCRBY', fair_key, FAIR_COUNT, -taken) <= 0 then
    redis.call('HDEL', fair_key, FAIR_COUNT)  -- none left: the hash goes with its last field
  end
  local gone, drops, sets = {}, {}, {}
  for _, g in ipairs(plan.dry) do
    local k = #drops
    gone[g] = true
    drops[k + 1], drops[k + 2], drops[k + 3] = 'h:' .. pre .. g, 't:' .. pre .. g, 'x:' .. pre .. g
  end
  for g, h in pairs(plan.head) do
    if not gone[g] then sets[#sets + 1], sets[#sets + 2] = 'h:' .. pre .. g, h end
  end
  for g in pairs(plan.relinked) do
    if not gone[g] then sets[#sets + 1], sets[#sets + 2] = 'x:' .. pre .. g, plan.nxt[g] end
  end
  if plan.done then
    drops[#drops + 1] = 'c:' .. level
  else
    sets[#sets + 1], sets[#sets + 2] = 'c:' .. level, plan.last
  end
  chunked('HDEL', fair_key, drops)
  chunked('HSET', fair_key, sets)
end

-- Take up to N staged messages of level LEVEL in rotation order (fair_plan): their values in
-- one HMGET per 1,000, each given to PUT (value, field, group), which stores it first; when
-- PUT answers false (or an error) the take stops there, that message and those after it
-- still staged (planned again for fewer, from the cache). A value found gone (a gap: a
-- message x-unique-mode replace dropped, lua/lib/unique.lua) is passed over, not counted as
-- taken. So a message costs its share of an HMGET and its PUT, a group a few commands.
-- GATE, optional: the per-group cap (fair_gate), told what was moved (GATE.moved, by PUT)
-- and which groups ran dry (GATE.flush) once the plan is saved. Returns (taken, more,
-- error, gaps, blocked): more whether level LEVEL's rotation still holds groups, blocked
-- when the cap stopped the plan (fair_plan).
local function fair_pop(fair_key, level, n, put, gate)
  local last = redis.call('HGET', fair_key, 'c:' .. level)
  if not last then return 0, false, nil, 0, false end
  local cache = {x = {}, h = {}, t = {}}
  local plan = fair_plan(fair_key, level, n, last, cache, gate)
  local taken, err = 0, nil
  for j = 1, #plan.order, 1000 do
    local values = redis.call('HMGET', fair_key, unpack(plan.order, j,
                                                        math.min(j + 999, #plan.order)))
    for k, value in ipairs(values) do
      if value then
        local ok
        ok, err = put(value, plan.order[j + k - 1], plan.groups[j + k - 1])
        if not ok then  -- stop before it: plan again for what went
          plan = fair_plan(fair_key, level, j + k - 2, last, cache, gate)
          if #plan.order == 0 then return 0, true, err, 0, false end
          fair_save(fair_key, level, plan, taken)
          if gate then gate.flush(plan.dry) end
          return taken, true, err, #plan.order - taken, false
        end
        taken = taken + 1
      end
    end
  end
  fair_save(fair_key, level, plan, taken)
  if gate then gate.flush(plan.dry) end
  return taken, not plan.done, nil, #plan.order - taken, plan.blocked
end

-- Move up to N staged messages of level stream STREAM into it, in rotation order (one per
-- group per turn), as new entries at its end (a TTL deadline becomes field e, a big
-- message's reference field r: delay.lua's entry_of). Never creates the stream (a deleted
-- queue keeps them staged, for delete to remove). Returns (moved, more, error, gaps,
-- blocked): more whether the level's rotation still holds groups, gaps the gone ones passed
-- over, blocked when GATE (optional, fair_gate) stopped it (fair_pop); error when FAIR_KEY
-- or STREAM holds another type
-- (found before anything was written: the first HGET and the first XADD). PLACED, optional,
-- gets {field, stream, new entry id} per message moved (a unique key it holds is re-pointed
-- at its entry: lua/lib/unique.lua's unique_moved).
local function fair_move(fair_key, stream, n, placed, gate)
  local _, herr = try('HGET', fair_key, FAIR_COUNT)
  if herr then return 0, true, herr, 0, false end
  local level = fair_level(stream)
  return fair_pop(fair_key, level, n, function(value, field, g)
    local id, xerr = try('XADD', stream, 'NOMKSTREAM', '*', unpack(entry_of(value)))
    if id and not xerr then
      if placed then placed[#placed + 1] = {field, stream, id} end
      if gate then gate.moved(g, level, id) end
    end
    return id and not xerr, xerr
  end, gate)
end

-- Remove up to N staged messages of level LEVEL from FAIR_KEY (purge), in rotation order,
-- freeing the bodies of big ones in BIG (a hash; another type there: bodies left). DROPPED,
-- optional, gets the field of each (a unique key it holds is released). Returns (removed,
-- more).
local function fair_drop(fair_key, level, n, big, dropped)
  local removed, more = fair_pop(fair_key, level, n, function(value, field)
    local rest = split_deadline(value)
    if string.sub(rest, 1, 2) == 'r:' then try('HDEL', big, string.sub(rest, 3)) end
    if dropped then dropped[#dropped + 1] = field end
    return true
  end)
  return removed, more
end

-- For operators (inspect.lua, read-only): the groups of level LEVEL's rotation in FAIR_KEY
-- with what each has waiting, walking at most MAX of them from the next in turn (one HGET
-- per group and one HMGET for all their heads and tails). Returns a flat {group, waiting,
-- ...} and whether that was the whole rotation.
local function fair_groups(fair_key, level, max)
  local last = redis.call('HGET', fair_key, 'c:' .. level)
  if not last then return {}, true end
  local pre, groups, g = level .. ':', {}, last
  repeat
    g = redis.call('HGET', fair_key, 'x:' .. pre .. g)
    groups[#groups + 1] = g
  until g == last or #groups >= max
  local fields = {}
  for j, name in ipairs(groups) do
    fields[2 * j - 1], fields[2 * j] = 'h:' .. pre .. name, 't:' .. pre .. name
  end
  local ht = redis.call('HMGET', fair_key, unpack(fields))
  local out = {}
  for j, name in ipairs(groups) do
    out[2 * j - 1] = name
    out[2 * j] = (tonumber(ht[2 * j]) or 0) - (tonumber(ht[2 * j - 1]) or 0)
  end
  return out, g == last
end
