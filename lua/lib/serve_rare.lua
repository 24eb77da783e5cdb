-- The rarer phases of read.lua (a library, included right after serve, which declares
-- lib_serve_rare): moving due delayed messages, serving entries parked with the holder
-- (requeued, reclaimed), setting entries aside (dead letters, expired ones), and fair
-- share's staging. State, KEYS and ARGV as lua/lib/serve.lua and read.lua describe them.
--
--@lazy: a read of ready fresh entries never builds it; the others call lib_serve_rare().
-- (kombu_streams/flatten.py).

-- Move a queue's due delayed messages into its streams (at most ctx.promote_left), and note
-- in ctx.dues when its next one is due. docs/design.rst, "Delayed delivery". A moved message
-- that holds a unique key keeps it: the key store is checked before anything moves (its
-- type; a queue without one pays that TYPE only), and then names the new entry
-- (docs/design.rst, "Unique keys").
local function promote_due(ctx, src)
  local idx = src.index
  if src.walk then
    local n, err = try('ZCARD', src.dkey)
    if err then return problem(ctx, src, src.dkey, err) end
    idx[DELAYED] = (n or 0) > 0 or nil
  end
  local rel = -1
  if idx[DELAYED] then
    local next_due, err = delay_next(src.dkey)
    if err then return problem(ctx, src, src.dkey, err) end
    local now = clock(ctx)
    if next_due and next_due <= now and ctx.promote_left > 0 and ctx.promote_bytes > 0 then
      local levels = {}  -- level -> its stream, all among this call's KEYS
      for _, i in ipairs(src.streams) do levels[string.match(KEYS[i], ':(%d+)$')] = KEYS[i] end
      local keyed, uerr = lib_unique().unique_store(src.store)
      if uerr then return problem(ctx, src, src.store, uerr) end
      -- x-fairness: a delayed message published with a group (its member names it in the
      -- staging hash, d:<member>) is staged when due, not appended (docs/design.rst, "Fair
      -- share"); one HGET per due message, only where the staging hash exists
      local divert, staged = nil, {}  -- staged: {member, nil, its staging field} each
      if redis.call('EXISTS', src.fair) == 1 then
        divert = function(member, value, stream)
          local g, gerr = try('HGET', src.fair, 'd:' .. member)
          if gerr or not g then return false end  -- another type: appended, as without
          redis.call('HDEL', src.fair, 'd:' .. member)
          local fair = lib_fair()
          local _, _, field = fair.fair_stage(src.fair, fair.fair_level(stream), g, value)
          staged[#staged + 1] = {member, nil, field}
          -- a key's reverse field left at this name by a message gone behind our back goes;
          -- unique_moved writes this one's if it has a key (lua/lib/unique.lua)
          if keyed then redis.call('HDEL', src.store, 'g:' .. field) end
          idx[FAIR .. stream] = true
          return true
        end
      end
      local moved, streams, perr, size, placed = promote(
        src.dkey, src.bodies, levels, KEYS[src.streams[1]], now, ctx.promote_left,
        ctx.promote_bytes, ctx.promoted == 0, divert)
      if keyed then  -- their keys name where they are now
        lib_unique().unique_moved(src.store, placed, 'd')
        lib_unique().unique_moved(src.store, staged, 'd')
      end
      ctx.promote_left, ctx.promoted = ctx.promote_left - moved, ctx.promoted + moved
      ctx.promote_bytes = ctx.promote_bytes - size
      if moved > 0 then src.announce = true end
      for _, key in ipairs(streams) do idx[key] = true end
      if perr then return problem(ctx, src, src.dkey, perr) end
      next_due = delay_next(src.dkey)
    end
    if next_due == nil then
      idx[DELAYED] = nil
    else
      rel = math.max(next_due - now, 0)
      if rel == 0 then  -- due, not moved yet: as good as ready
        src.more, src.announce = true, true
      end
    end
  end
  note_due(ctx, src, rel)
end

-- Drop one expired entry of stream I of an expiring queue (x-expires: Celery's event, reply
-- and pidbox queues), with its big body if any, rather than file it: such a queue's
-- dead-letter stream would outlive the queue and grow with every message a slow receiver
-- let expire (RabbitMQ too drops expired messages of a queue without a dead-letter
-- exchange). It counts against the call's set-aside budget. docs/design.rst, "Message TTL".
local function drop_expired(ctx, src, i, id, fields)
  if src.bytes then src.bytes = src.bytes + lib_bytes().entry_bytes(fields, src.big) end
  redis.call('XACK', KEYS[i], src.group, id)
  redis.call('XDEL', KEYS[i], id)
  src.dropped = true  -- may have freed a slot of a capped group (serve.lua's finish_source)
  local token = not src.shared and field(fields, 'r')
  if token then try('HDEL', src.big, token) end  -- another type there: no body to free
  ctx.aside_left = ctx.aside_left - 1
end

-- Move one entry of stream I to the source's dead-letter stream. When that stream cannot take
-- it (another type at its name), the entry is parked with UNFILED instead and the problem
-- noted: the queue keeps flowing, and the entry is tried again after a lease.
local function set_aside(ctx, src, i, id, fields, reason, deliveries)
  -- filed or parked with UNFILED, it waits no more (x-max-length-bytes, lua/lib/bytes.lua)
  if src.bytes then src.bytes = src.bytes + lib_bytes().entry_bytes(fields, src.big) end
  local err = dead_letter(KEYS[i], src.group, id, fields, src.dlq, reason, deliveries,
                          src.shared)
  if err then
    redis.call('XCLAIM', KEYS[i], src.group, UNFILED, 0, id, 'JUSTID')
    src.unfiled = (src.unfiled or 0) + 1  -- still pending (the in-flight bound counts it)
    return problem(ctx, src, src.dlq, err)
  end
  if src.shared and not ctx.trim[KEYS[i]] then  -- trimmed once, in finish: not per entry
    ctx.trim[KEYS[i]] = true
    ctx.trim[#ctx.trim + 1] = KEYS[i]
  end
  local aside, n = ctx.aside, #ctx.aside
  aside[n + 1], aside[n + 2], aside[n + 3], aside[n + 4] = src.q, i, id, reason
  ctx.aside_left = ctx.aside_left - 1
  src.dropped = true  -- may have freed a slot of a capped group (serve.lua's finish_source)
end

-- Claim the parked entries TAKE (XPENDING records) of stream I for the consumer and deliver
-- them, setting aside those past the delivery limit (counted here, so crash loops count as
-- much as rejects). Returns the number delivered.
local function claim_held(ctx, src, i, take)
  local key, ids, counts = KEYS[i], {}, {}
  for j, p in ipairs(take) do
    ids[j] = p[1]
    counts[p[1]] = tonumber(p[4]) + 1
  end
  local claimed = redis.call('XCLAIM', key, src.group, ctx.consumer, 0, unpack(ids))
  local seen, delivered = {}, 0
  for _, e in ipairs(claimed) do
    if type(e) == 'table' then
      seen[e[1]] = true
      spend(ctx, src, e[2])
      if ctx.limit > 0 and counts[e[1]] > ctx.limit then
        set_aside(ctx, src, i, e[1], e[2], 'delivery limit', counts[e[1]] - 1)
      elseif deliver(ctx, src, i, e[1], e[2], counts[e[1]]) then
        delivered = delivered + 1
      end
    end
  end
  -- entries deleted while parked (Redis 6.2 keeps them in the PEL): drop the PEL record
  for _, id in ipairs(ids) do
    if not seen[id] then redis.call('XACK', key, src.group, id) end
  end
  return delivered
end

-- Serve the entries parked with the holder in stream I, in id order, suspects alone
-- (docs/design.rst, "Delivery counts and dead letters"). Returns 'gone' when the stream
-- or its group does not exist, 'error' on a problem. An entry not delivered (set aside,
-- deleted while parked) leaves room, so look again; each pass empties what it saw, so it ends.
-- Each pass takes at most a batch (the byte budget; see the top of this file).
local function serve_held(ctx, src, i)
  local key, group, want = KEYS[i], src.group, batch(ctx, src)
  if want <= 0 then  -- the byte budget is spent: the rest next call
    src.more = true
    return halt(ctx)
  end
  local held, err = try('XPENDING', key, group, '-', '+', want, ctx.holder)
  if err then return problem(ctx, src, key, err) end
  if held == nil then  -- no group; a fanout group is made by its binding, never here
    if src.shared then return 'gone' end
    local exists, gerr = ensure_group(key, group)
    if gerr then return problem(ctx, src, key, gerr) end
    if not exists then return 'gone' end
    held = {}
  end
  src.alive = true
  local done = true  -- every held entry of the stream was served
  while #held > 0 do
    if ctx.aside_left <= 0 then  -- set aside enough for one call: the rest next time
      done = false
      halt(ctx)
      break
    end
    local take, suspect = {}, false
    for _, p in ipairs(held) do
      if tonumber(p[4]) >= 1 then
        suspect = true
        if #take == 0 and #ctx.out == REPLY_HEAD then take[1] = p end
        break
      end
      take[#take + 1] = p
    end
    if #take == 0 then  -- the next one must go alone, and this call has others already
      done = false
      halt(ctx)
      break
    end
    local delivered = claim_held(ctx, src, i, take)
    if suspect and delivered > 0 then  -- delivered what came before a suspect, or it
      done = false
      halt(ctx)
      break
    end
    if not suspect and #held < want then break end  -- that was the last held entry
    if ctx.left <= 0 then
      done = false
      break
    end
    want = batch(ctx, src)
    if want <= 0 then  -- the byte budget is spent
      done = false
      halt(ctx)
      break
    end
    held = redis.call('XPENDING', key, group, '-', '+', want, ctx.holder)
  end
  if not done then
    src.more = true
  elseif src.index then
    src.index[HELD .. key] = nil
  end
end

-- Fair share (docs/design.rst, "Fair share"): stream I of a queue with x-fairness has no
-- undelivered entries left, and its level's staging may hold messages: move as many as this
-- call may still deliver of it (COUNT, and the byte budget at the expected size) into the
-- stream, in rotation order, then read them as fresh entries. So a message enters its stream
-- only just before it is read, and everything after delivery is as on any queue. The index
-- keeps g:<stream> while the level's staging is not empty.
local function serve_staged(ctx, src, i)
  local key, idx = KEYS[i], src.index
  if src.gate then src.gate.level() end  -- each level its own budget of passes
  while ctx.left > 0 and idx[FAIR .. key] and not idx[key] do
    local want = batch(ctx, src)  -- the first of a call may be one entry, to learn the size
    if want <= 0 then  -- the byte budget is spent
      src.more = true
      return halt(ctx)
    end
    if src.keyed == nil then  -- a staged message holding a unique key: the store names it
      local kerr
      src.keyed, kerr = lib_unique().unique_store(src.store)
      if kerr then return problem(ctx, src, src.store, kerr) end
    end
    local placed = src.keyed and {} or nil
    if src.gcap and not src.gate then  -- x-group-max-in-flight: the call's per-group cap
      local levels = {}
      for _, k in ipairs(src.streams) do levels[lib_fair().fair_level(KEYS[k])] = KEYS[k] end
      src.gate = lib_fair().fair_gate(src.fair, src.gcap, levels, src.group,
                                      KEYS[src.streams[1]])
    end
    local moved, more, err, gaps, blocked = lib_fair().fair_move(src.fair, key, want, placed,
                                                                src.gate)
    if blocked then src.gfull = true end  -- groups at their cap stopped it
    if placed and #placed > 0 then lib_unique().unique_moved(src.store, placed, 'g') end
    if not more then idx[FAIR .. key] = nil end
    if err then return problem(ctx, src, src.fair, err) end
    -- gaps (replaced messages) passed over are work without a delivery: bounded per call as
    -- entries set aside are, the rest by the next call (the index keeps g:<stream>, so its
    -- marker is set again)
    ctx.aside_left = ctx.aside_left - gaps
    if moved == 0 and (blocked or not (more and gaps > 0 and ctx.aside_left > 0)) then
      return
    end
    if moved > 0 then
      idx[key] = true
      local before = ctx.copied
      local gone = serve_fresh(ctx, src, i)
      if gone ~= nil or ctx.halted then return gone end
      -- every moved entry read, and the stream had none undelivered before: dry (no probe)
      if ctx.copied - before == moved then idx[key] = nil end
    end
  end
end

-- Whether level stream KEY's staging (in the source's staging hash) holds messages, for a
-- walk: one HEXISTS, none when the hash does not exist (looked at once per walk). Returns
-- (staged, error).
local function fair_walk(src, key)
  if src.fair_exists == nil then
    src.fair_exists = src.fair ~= src.wake and redis.call('EXISTS', src.fair) == 1
  end
  if not src.fair_exists then return false, nil end
  local r, err = try('HEXISTS', src.fair, 'c:' .. lib_fair().fair_level(key))
  if err then return true, err end
  return r == 1, nil
end

