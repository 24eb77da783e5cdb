-- The phases of read.lua (a library, included after common, delay, expiry, rate, inflight,
-- unique and aging; KEYS and ARGV as read.lua's header lays them out): open a source, serve its
-- held then its fresh entries stream by stream, and save what the call learned.
--
-- State lives in one table, ctx (made by read.lua), and one table per source, src:
--   ctx.consumer, ctx.holder, ctx.limit   who reads, who parks, the delivery limit
--   ctx.left                              messages this call may still deliver
--   ctx.out, ctx.problems, ctx.aside,     the reply's parts (see read.lua)
--   ctx.unsettled
--   ctx.aside_left                        entries this call may still set aside (COUNT +
--                                         100: a backlog of them is worked off over calls)
--   ctx.promote_left, ctx.dues, ctx.now   delayed messages this call may still move, the
--                                         reply's next due times, the server's clock
--   ctx.bytes_left, ctx.copied            the byte budget left, entries copied so far
--   ctx.promote_bytes, ctx.promoted       the same for moving delayed messages
--   ctx.trim                              fanout streams an entry was set aside in: trimmed
--                                         once, at the end of the call
--   src.q, src.group, src.shared, src.mode, src.ttl, src.wake, src.dlq, src.index_key,
--   src.dkey, src.bodies, src.big,        (its keys; the delayed ones: lua/lib/delay.lua)
--   src.counters, src.args, src.rate_key, src.store (the key store, lua/lib/unique.lua),
--   src.flag     (the in-flight flag, lua/lib/inflight.lua), src.fair (the staging hash,
--                lua/lib/fair.lua)
--   src.aging    x-priority-aging's state (lua/lib/aging.lua) when it has the argument,
--                false without; opened with src.rate
--   src.expired                           entries this call set aside past their TTL
--   src.rate     its limiter (lua/lib/rate.lua) when it has x-rate-limit, false without;
--                nil until a stream of it has work to serve (an idle queue pays nothing)
--   src.capped   the limiter let no more of it through in this call
--   src.cap      x-max-in-flight's room {room, served} (lua/lib/inflight.lua): room is N less
--                what was in flight when it was opened (with src.rate); false without
--   src.full     the in-flight limit let no more of it through in this call
--   src.freed    acks that rode along freed slots of it (its flag is looked at)
--   src.due_at   where its next due time is in ctx.dues (a limited source's next slot
--                may replace it: the reply's dues carry both, docs/design.rst)
--   ctx.halted   a serve step stopped the whole call (budget spent, suspect alone): a
--                rate limit's cap on one source must not undo that
--   src.streams                           its streams in KEYS (their indices)
--   src.est                               the bytes expected of its next entry: the
--                                         caller's hint, raised by every entry copied
--   src.state    nil: not reached yet; 'open'; 'skip': its marker says nothing is ready;
--                'broken': its ready index holds another type
--   src.index    the ready index as a table (member -> true), nil for a fanout source
--   src.more     may still hold ready messages (beyond what the index says)
--   src.announce this call made work ready (moved due messages): its marker must be set
-- A command that may meet another program's key at our names (WRONGTYPE) runs through try():
-- the error is noted against that source and the call serves the others, losing nothing.
--
-- Bytes (docs/design.rst, "Reads bounded by bytes"). XREADGROUP and XCLAIM cannot tell an
-- entry's size before copying it, so a source is read in batches: each asks for as many
-- entries as fit what is left of BYTES at src.est bytes each (batch()), the first one of a
-- call always at least one (a message bigger than BYTES is delivered, alone), none once
-- the budget is spent. A batch the budget did not cut is the last of its stream, as a read
-- by COUNT alone was: with the caller's hint right, one XREADGROUP per stream per call.
-- Worst case: a batch of n entries sized for src.est meets entries bigger than any seen in
-- the call and than the hint; it copies up to n x the largest entry M, n <= min(COUNT,
-- BYTES / src.est). Entries within a factor r of each other keep a call under about
-- max(r x BYTES, M). Due delayed messages are sized before they are copied (HSTRLEN), so
-- moving them overshoots never: at most BYTES more per call, or one message alone.
-- A big message's entry (field r, docs/design.rst "Big messages") costs the call an HSTRLEN
-- of its body, never a copy: the body counts against BYTES as the caller will fetch it.

local PROMOTE = 500  -- most delayed messages moved per call

-- The call's state (see the top of this file): CONSUMER reads up to COUNT messages, HOLDER
-- parks, LIMIT is the delivery limit.
local function new_context(consumer, count, holder, limit, bytes)
  return {consumer = consumer, left = count, holder = holder, limit = limit, out = {},
          problems = {}, aside = {}, aside_left = count + 100, promote_left = PROMOTE,
          dues = {}, unsettled = {}, bytes_left = bytes, copied = 0, promote_bytes = bytes,
          promoted = 0, trim = {}}
end

-- The Q sources of a call over S streams, F of them on fanout streams, from read.lua's KEYS
-- and ARGV layout, and the source of each stream (by stream index): the F fanout sources'
-- streams first, then the queue sources' by level (see read.lua's header).
local function load_sources(S, Q, F)
  local sources, of, fan, own = {}, {}, {}, {}
  for q = 1, Q do
    local k = S + 12 * q - 1  -- the source's last key but its staging hash
    sources[q] = {q = q, group = ARGV[3 + 5 * q], shared = ARGV[4 + 5 * q] == 'f',
                  mode = ARGV[5 + 5 * q], ttl = tonumber(ARGV[6 + 5 * q]) or 0,
                  est = tonumber(ARGV[7 + 5 * q]) or 0,
                  wake = KEYS[k - 10], dlq = KEYS[k - 9], index_key = KEYS[k - 8],
                  dkey = KEYS[k - 7], bodies = KEYS[k - 6], big = KEYS[k - 5],
                  counters = KEYS[k - 4], args = KEYS[k - 3], rate_key = KEYS[k - 2],
                  store = KEYS[k - 1], flag = KEYS[k], fair = KEYS[k + 1], streams = {},
                  visited = {}, expired = 0}
    if sources[q].shared then fan[#fan + 1] = sources[q] else own[#own + 1] = sources[q] end
  end
  for i = 1, S do
    local src = fan[i] or own[(i - F - 1) % #own + 1]
    src.streams[#src.streams + 1] = i
    of[i] = src
  end
  return sources, of
end

-- Ack the (stream index, entry id) pairs in ARGV[FIRST..], by stream, as ack.lua does: only
-- those the consumer still owns (or trusts it owns: a negative index, see ack_pairs); the
-- others are counted per source in ctx.unsettled. A stream holding another type is a
-- problem of its source only. A source whose acks freed slots while its in-flight flag was
-- raised gets its marker back, as ack.lua does (docs/design.rst, "Global concurrency").
local function ride_acks(ctx, of, first)
  local by, order, at = ack_pairs(first, #of)
  local freed = {}  -- sources with slots freed, in order
  if not by then  -- before anything is written: the whole call fails, and says why
    error({err = 'read: expected a stream index 1..' .. #of .. ' at ARGV[' .. at ..
                 '] (negative: trusted)'})
  end
  for _, i in ipairs(order) do
    local src = of[i]
    local owned, lost, err = ackable(KEYS[i], src.group, ctx.consumer, by[i])
    if owned then
      if lost > 0 then ctx.unsettled[src.q] = (ctx.unsettled[src.q] or 0) + lost end
      local ok, done = pcall(ack_ids, KEYS[i], src.group, owned)
      if not ok then
        err = tostring(done)
      elseif done > 0 and not src.freed then
        src.freed = true
        freed[#freed + 1] = src
      end
    end
    if err then
      ctx.problems[#ctx.problems + 1] = src.q
      ctx.problems[#ctx.problems + 1] = err .. ' (key ' .. KEYS[i] .. ')'
    end
  end
  for _, src in ipairs(freed) do  -- one TYPE each: all a queue without the limit pays
    local flagged, err = inflight_flagged(src.flag)
    local key = src.flag
    if flagged then
      err, key = inflight_release(src.flag, src.wake, KEYS[src.streams[1]], src.ttl), src.wake
    end
    if err then
      ctx.problems[#ctx.problems + 1] = src.q
      ctx.problems[#ctx.problems + 1] = err .. ' (key ' .. key .. ')'
    end
  end
end

local set_aside, drop_expired  -- defined below; deliver and claim_held use them (no globals)

-- Note ERR, met on KEY, against source SRC; returns 'error' so callers can
-- 'return problem(...)'.
local function problem(ctx, src, key, err)
  src.failed = true
  ctx.problems[#ctx.problems + 1] = src.q
  ctx.problems[#ctx.problems + 1] = err .. ' (key ' .. key .. ')'
  return 'error'
end

-- Stop the whole call: nothing more is delivered by it (see ctx.halted).
local function halt(ctx)
  ctx.left, ctx.halted = 0, true
end

-- A member list as a set.
local function as_set(members)
  local set = {}
  for _, m in ipairs(members) do set[m] = true end
  return set
end

-- The server's clock for this call, read once.
local function clock(ctx)
  if ctx.now == nil then ctx.now = now_ms() end
  return ctx.now
end

-- How many entries the next XREADGROUP or XCLAIM of SRC may copy: what COUNT leaves, cut to
-- what the byte budget leaves at SRC's expected entry size; at least one while the call has
-- copied nothing (one message always fits alone), one to learn the size when none is known,
-- none once the budget is spent. See the top of this file for the worst case.
local function batch(ctx, src)
  local n = ctx.left
  if ctx.copied > 0 and ctx.bytes_left <= 0 then return 0 end
  if src.est <= 0 then return math.min(n, 1) end
  n = math.min(n, math.floor(ctx.bytes_left / src.est))
  if n < 1 and ctx.copied == 0 then n = 1 end
  return math.max(n, 0)
end

-- Count entry FIELDS, just copied from one of SRC's streams, against the byte budget.
local function spend(ctx, src, fields)
  local size = 0
  if type(fields) == 'table' then
    for _, v in ipairs(fields) do size = size + #tostring(v) end
  end
  ctx.bytes_left, ctx.copied = ctx.bytes_left - size, ctx.copied + 1
  if size > src.est then src.est = size end
end

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
      local divert = nil
      if redis.call('EXISTS', src.fair) == 1 then
        divert = function(member, value, stream)
          local g, gerr = try('HGET', src.fair, 'd:' .. member)
          if gerr or not g then return false end  -- another type: appended, as without
          redis.call('HDEL', src.fair, 'd:' .. member)
          local fair = lib_fair()
          fair.fair_stage(src.fair, fair.fair_level(stream), g, value)
          idx[FAIR .. stream] = true
          return true
        end
      end
      local moved, streams, perr, size, placed = promote(
        src.dkey, src.bodies, levels, KEYS[src.streams[1]], now, ctx.promote_left,
        ctx.promote_bytes, ctx.promoted == 0, divert)
      if keyed then lib_unique().unique_promoted(src.store, placed) end
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
  ctx.dues[#ctx.dues + 1] = src.q
  ctx.dues[#ctx.dues + 1] = rel
  src.due_at = #ctx.dues
end

-- First visit of a source: gate it on its marker (mode 'm'), load its ready index, and move
-- what is due of its delayed messages. True when it is to be served.
local function open_source(ctx, src)
  if src.state == nil then
    src.state = 'open'
    if src.mode == 'm' and redis.call('EXISTS', src.wake) == 0 then
      src.state = 'skip'  -- no marker: nothing is ready (the wake-up invariant)
    elseif not src.shared then
      local members, err = try('SMEMBERS', src.index_key)
      if err then
        problem(ctx, src, src.index_key, err)
        src.state = 'broken'
      else
        src.index, src.had = as_set(members), as_set(members)
        src.walk = src.mode == 'w' or not src.index[COMPLETE]
        promote_due(ctx, src)
      end
    end
  end
  return src.state == 'open'
end

-- Hand one entry to the consumer, or set it aside when it cannot be a message of ours. A big
-- message's entry (field r: the token of its body in the queue's big hash) goes out as {token}
-- in place of the payload, its body counted against the byte budget (an HSTRLEN, no copy);
-- one whose body is gone is set aside, and so is one past its TTL deadline (reason expired,
-- docs/design.rst "Message TTL"). When the big hash holds another type the entry is parked
-- with UNFILED (tried again after a lease) and the problem noted. True when delivered.
local function deliver(ctx, src, i, id, fields, count)
  -- Message TTL: past its deadline, never handed out. An entry without one has one field.
  local deadline = type(fields) == 'table' and fields[3] ~= nil and deadline_of(fields)
  if deadline and deadline <= clock(ctx) then
    if src.ttl > 0 then  -- an expiring queue's (x-expires): dropped, counted, not filed
      drop_expired(ctx, src, i, id, fields)
      src.expired = src.expired + 1
    elseif not set_aside(ctx, src, i, id, fields, EXPIRED, count - 1) then
      src.expired = src.expired + 1
    end
    return false
  end
  local payload = field(fields, 'm')
  if payload == nil then
    local token = not src.shared and field(fields, 'r')
    if not token then
      set_aside(ctx, src, i, id, fields, 'malformed: no m field', count)
      return false
    end
    local size, err = try('HSTRLEN', src.big, token)
    if err then
      redis.call('XCLAIM', KEYS[i], src.group, UNFILED, 0, id, 'JUSTID')
      problem(ctx, src, src.big, err)
      return false
    end
    if size == 0 then
      set_aside(ctx, src, i, id, fields, 'big message body missing: no ' .. token .. ' in ' ..
                src.big, count)
      return false
    end
    ctx.bytes_left = ctx.bytes_left - size
    if size > src.est then src.est = size end
    payload = {token}
  end
  local out, n = ctx.out, #ctx.out
  out[n + 1], out[n + 2], out[n + 3], out[n + 4] = i, id, count, payload
  ctx.left = ctx.left - 1
  return true
end

-- Drop one expired entry of stream I of an expiring queue (x-expires: Celery's event, reply
-- and pidbox queues), with its big body if any, rather than file it: such a queue's
-- dead-letter stream would outlive the queue and grow with every message a slow receiver
-- let expire (RabbitMQ too drops expired messages of a queue without a dead-letter
-- exchange). It counts against the call's set-aside budget. docs/design.rst, "Message TTL".
drop_expired = function(ctx, src, i, id, fields)
  redis.call('XACK', KEYS[i], src.group, id)
  redis.call('XDEL', KEYS[i], id)
  local token = not src.shared and field(fields, 'r')
  if token then try('HDEL', src.big, token) end  -- another type there: no body to free
  ctx.aside_left = ctx.aside_left - 1
end

-- Move one entry of stream I to the source's dead-letter stream. When that stream cannot take
-- it (another type at its name), the entry is parked with UNFILED instead and the problem
-- noted: the queue keeps flowing, and the entry is tried again after a lease.
set_aside = function(ctx, src, i, id, fields, reason, deliveries)
  local err = dead_letter(KEYS[i], src.group, id, fields, src.dlq, reason, deliveries,
                          src.shared)
  if err then
    redis.call('XCLAIM', KEYS[i], src.group, UNFILED, 0, id, 'JUSTID')
    return problem(ctx, src, src.dlq, err)
  end
  if src.shared and not ctx.trim[KEYS[i]] then  -- trimmed once, in finish: not per entry
    ctx.trim[KEYS[i]] = true
    ctx.trim[#ctx.trim + 1] = KEYS[i]
  end
  local aside, n = ctx.aside, #ctx.aside
  aside[n + 1], aside[n + 2], aside[n + 3], aside[n + 4] = src.q, i, id, reason
  ctx.aside_left = ctx.aside_left - 1
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
        if #take == 0 and #ctx.out == 0 then take[1] = p end
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

-- Serve entries of stream I the group has not delivered yet, in batches (the byte budget; see
-- the top of this file). Returns 'gone' when the stream does not exist (or, for a fanout
-- group, the group), 'error' on a problem.
local function serve_fresh(ctx, src, i)
  local key, group = KEYS[i], src.group
  while true do
    local want = batch(ctx, src)
    if want <= 0 then  -- the byte budget is spent: the rest next call
      src.more = true
      return halt(ctx)
    end
    local cut = want < ctx.left  -- the budget, not COUNT, sized this batch
    local reply, err = try_read(
      'XREADGROUP', 'GROUP', group, ctx.consumer, 'COUNT', want, 'STREAMS', key, '>')
    if err then return problem(ctx, src, key, err) end
    if reply == nil then  -- no group (or no stream) yet
      if src.shared then return 'gone' end
      local exists, gerr = ensure_group(key, group)
      if gerr then return problem(ctx, src, key, gerr) end
      if not exists then return 'gone' end
      reply = redis.call(
        'XREADGROUP', 'GROUP', group, ctx.consumer, 'COUNT', want, 'STREAMS', key, '>')
    end
    src.alive = true
    local fresh, expired = read_entries(reply), src.expired
    for _, e in ipairs(fresh) do
      spend(ctx, src, e[2])
      deliver(ctx, src, i, e[1], e[2], 1)
    end
    if #fresh < want then  -- the stream has no undelivered entries left
      if src.index then src.index[key] = nil end
      return
    end
    -- The batch filled: more may be left. No probe for it (one command per read at prefetch
    -- 1): if the stream ran dry just now, the next read finds that out and clears the index.
    -- Only a batch the budget cut, or one with expired entries (the live ones behind them
    -- are served in this call: docs/design.rst, "Message TTL"), is followed by another,
    -- while COUNT and aside allow; once aside is spent the call stops, as serve_held does.
    if ctx.aside_left <= 0 then
      src.more = true
      return halt(ctx)
    end
    if not (cut or src.expired > expired) or ctx.left <= 0 then
      src.more = true
      return
    end
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
  while ctx.left > 0 and idx[FAIR .. key] and not idx[key] do
    local want = batch(ctx, src)  -- the first of a call may be one entry, to learn the size
    if want <= 0 then  -- the byte budget is spent
      src.more = true
      return halt(ctx)
    end
    local moved, more, err = lib_fair().fair_move(src.fair, key, want)
    if not more then idx[FAIR .. key] = nil end
    if err then return problem(ctx, src, src.fair, err) end
    if moved == 0 then return end
    idx[key] = true
    local before = ctx.copied
    local gone = serve_fresh(ctx, src, i)
    if gone ~= nil or ctx.halted then return gone end
    -- every moved entry read, and the stream had none undelivered before: dry (no probe)
    if ctx.copied - before == moved then idx[key] = nil end
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

-- The limits of queue source SRC, read once per call when a stream of it first has work to
-- serve (an idle queue pays nothing): one HMGET of its arguments (all a queue without limits
-- pays), then the rate limiter's state (lua/lib/rate.lua) and what is in flight
-- (lua/lib/inflight.lua) only where it has those arguments. False on a problem (noted).
local function open_limits(ctx, src)
  local r, err = try('HMGET', src.args, RATE_LIMIT, RATE_BURST, MAX_IN_FLIGHT, PRIORITY_AGING)
  if err then
    problem(ctx, src, src.args, err)
    return false
  end
  r = r or {}
  src.aging = false
  if r[4] then  -- lua/lib/aging.lua
    src.aging, err = lib_aging().aging_open(r[4])
    if err then
      problem(ctx, src, src.args, err)
      return false
    end
  end
  local rate, rerr, rkey = nil, nil, nil
  if r[1] then
    rate, rerr, rkey = lib_rate().rate_open(r[1], r[2], src.args, src.rate_key,
                                            function() return clock(ctx) end)
  end
  if rerr then
    problem(ctx, src, rkey, rerr)
    return false
  end
  src.rate, src.cap = rate or false, false
  if r[3] then
    local max, merr = inflight_max(r[3])
    if merr then
      problem(ctx, src, src.args, merr)
      return false
    end
    local n, ferr, fkey = inflight_count(src.streams, src.group)
    if ferr then
      problem(ctx, src, fkey, ferr)
      return false
    end
    src.cap = {room = max - n, served = 0}
  end
  return true
end

-- Serve stream I of an open source: the parts its ready index names (both parts when the
-- source is walked and the stream is not empty; always both for a fanout source).
local function serve_stream(ctx, src, i)
  local key, idx = KEYS[i], src.index
  src.visited[i] = true
  if idx and src.walk then
    local staged, serr = fair_walk(src, key)
    if serr then return problem(ctx, src, src.fair, serr) end
    idx[FAIR .. key] = staged or nil
    local len, err = try('XLEN', key)
    if err then return problem(ctx, src, key, err) end
    if len == 0 then  -- nothing in it, so nothing ready but what is staged
      idx[key], idx[HELD .. key] = nil, nil
      if not src.alive and redis.call('EXISTS', key) == 1 then src.alive = true end
      if not staged then return end
    else
      idx[key], idx[HELD .. key] = true, true
    end
  end
  if idx and not idx[key] and not idx[HELD .. key] and not idx[FAIR .. key] then
    return  -- nothing ready here
  end
  -- Global rate limit and concurrency: the call delivers at most what the limiter lets
  -- through of this source, and what x-max-in-flight leaves room for (over all its
  -- streams, in serving order, so priorities and requeued-first hold); what is left stays
  -- ready in Redis. docs/design.rst, "Global rate limit" and "Global concurrency".
  if src.rate == nil and not src.shared then  -- read once, when there is work to serve
    if not open_limits(ctx, src) then return 'error' end  -- nothing of it served
  end
  if src.aging then  -- aged lower levels first, one message each (lua/lib/aging.lua)
    lib_aging().aging_serve(ctx, src, i, clock(ctx), serve_stream)
    if ctx.left <= 0 or src.failed then return end
  end
  local rate, cap, left, before = src.rate, src.cap, ctx.left, #ctx.out
  if rate or cap then
    local room = left
    if rate then
      room = math.min(room, rate.allow - rate.served)
      if rate.allow - rate.served <= 0 then src.capped = true end
    end
    if cap then
      room = math.min(room, cap.room - cap.served)
      if cap.room - cap.served <= 0 then src.full = true end
    end
    if room <= 0 then return end
    ctx.left = room
  end
  local gone = nil
  if not idx or idx[HELD .. key] then gone = serve_held(ctx, src, i) end
  if gone == nil and ctx.left > 0 and (not idx or idx[key]) then
    gone = serve_fresh(ctx, src, i)
  end
  if gone == nil and idx and idx[FAIR .. key] and not idx[key] and not ctx.halted then
    gone = serve_staged(ctx, src, i)
  end
  if gone == 'gone' and idx then idx[key], idx[HELD .. key] = nil, nil end
  if rate or cap then
    local got = (#ctx.out - before) / 4
    if rate then
      rate.served = rate.served + got
      if rate.served >= rate.allow then src.capped = true end
    end
    if cap then
      cap.served = cap.served + got
      if cap.served >= cap.room then src.full = true end
    end
    ctx.left = ctx.halted and 0 or left - got
  end
end

-- Write back what this call learned about a reached queue's ready index: the members it
-- found dry are removed, those a walk found are added (with the queue's expiry), and a walk
-- of a queue that exists marks the index COMPLETE. True when the index still names one of
-- the source's streams, i.e. ready work may be left.
local function save_index(ctx, src)
  local idx = src.index
  if src.walk then  -- streams a walk did not reach (COUNT ran out): empty or maybe ready
    for _, i in ipairs(src.streams) do
      if not src.visited[i] then
        local len = try('XLEN', KEYS[i])
        local maybe = len ~= 0  -- nil (another type) counts as maybe: read and report it
        idx[KEYS[i]], idx[HELD .. KEYS[i]] = maybe or nil, maybe or nil
        local staged, serr = fair_walk(src, KEYS[i])
        idx[FAIR .. KEYS[i]] = (staged or serr) and true or nil
      end
    end
  end
  if src.walk and src.alive and not src.failed then idx[COMPLETE] = true end
  local adds, drops = {}, {}
  for m in pairs(idx) do if not src.had[m] then adds[#adds + 1] = m end end
  for m in pairs(src.had) do if not idx[m] then drops[#drops + 1] = m end end
  if #drops > 0 then redis.call('SREM', src.index_key, unpack(drops)) end
  if #adds > 0 then
    redis.call('SADD', src.index_key, unpack(adds))
    local ttl = src.ttl
    if ttl <= 0 then ttl = redis.call('PTTL', KEYS[src.streams[1]]) end
    if ttl > 0 then redis.call('PEXPIRE', src.index_key, ttl) end
  end
  for _, i in ipairs(src.streams) do
    if idx[KEYS[i]] or idx[HELD .. KEYS[i]] or idx[FAIR .. KEYS[i]] then return true end
  end
  return false
end

-- The end of the call for one source: its status character; its marker removed if seen dry,
-- set if work is left and it was popped, walked or announced, else left as it was (a popped
-- one is always given back). Why no wake-up is lost: docs/design.rst, "Wake-ups".
local function finish_source(ctx, src)
  if src.state == nil then
    if src.mode == 'p' then
      local err = arm(src.wake, KEYS[src.streams[1]], src.ttl)
      if err then problem(ctx, src, src.wake, err) end
    end
    return src.failed and 'e' or '-'
  end
  if src.state == 'skip' then return '0' end
  local more = src.more
  if src.state == 'open' and src.index then more = save_index(ctx, src) or more end
  if src.state == 'broken' then  -- its index cannot be read: leave its marker be,
    if src.mode == 'p' then       -- but give a popped wake-up back
      local err = arm(src.wake, KEYS[src.streams[1]], src.ttl)
      if err then problem(ctx, src, src.wake, err) end
    end
    return 'e'
  end
  local err = nil
  if more and (src.capped or src.full) then
    -- Limited: ready work is left but may not go out now. No marker (a set one would wake
    -- every idle consumer to be refused in turn). At the rate limit the reply's due time
    -- brings this consumer back at the next slot (docs/design.rst, "Global rate limit");
    -- at x-max-in-flight the flag makes the settle that frees a slot set the marker again
    -- (docs/design.rst, "Global concurrency"): raised first, or the marker stays.
    if src.capped then
      local slot = lib_rate().rate_next(src.rate, clock(ctx))
      local at, dues = src.due_at, ctx.dues
      if at == nil then  -- its delayed set met a problem: the slot alone
        dues[#dues + 1], dues[#dues + 2] = src.q, slot
      elseif dues[at] < 0 or dues[at] > slot then
        dues[at] = slot
      end
    end
    if src.full then
      err = inflight_raise(src.flag, src.ttl)
      if err then
        problem(ctx, src, src.flag, err)
        return 'e'
      end
    end
    err = pcall_error(redis.pcall('ZREM', src.wake, 'w'))
    if err then problem(ctx, src, src.wake, err) end
    return src.failed and 'e' or '0'
  end
  if not more then
    err = pcall_error(redis.pcall('ZREM', src.wake, 'w'))
  elseif src.mode == 'p' or src.walk or src.announce then
    err = arm(src.wake, KEYS[src.streams[1]], src.ttl)
  end
  if err then problem(ctx, src, src.wake, err) end
  if src.failed then return 'e' end
  return more and '1' or '0'
end

-- The reply of the call (see read.lua): status per source, problems, aside, dues, unsettled,
-- then the deliveries.
local function finish(ctx, sources)
  for _, stream in ipairs(ctx.trim) do trim_shared(stream) end  -- fanout streams set aside
  for _, src in ipairs(sources) do  -- Message TTL: each queue's count of expired messages
    if src.rate then lib_rate().rate_save(src.rate, src.rate_key, clock(ctx)) end
    if src.expired > 0 then
      local err = count_expired(src.counters, KEYS[src.streams[1]], src.expired)
      if err then problem(ctx, src, src.counters, err) end
    end
  end
  local status, unsettled = {}, {}
  for q = 1, #sources do
    status[q] = finish_source(ctx, sources[q])
    if ctx.unsettled[q] then
      unsettled[#unsettled + 1] = q
      unsettled[#unsettled + 1] = ctx.unsettled[q]
    end
  end
  local reply = {table.concat(status), ctx.problems, ctx.aside, ctx.dues, unsettled}
  for _, v in ipairs(ctx.out) do reply[#reply + 1] = v end
  return reply
end
