-- The phases of read.lua (a library, included after common, delay, expiry, rate, inflight,
-- unique and aging; KEYS and ARGV as read.lua's header lays them out): open a source, serve its
-- held then its fresh entries stream by stream, and save what the call learned.
--
-- State lives in one table, ctx (made by read.lua), and one table per source, src:
--   ctx.consumer, ctx.holder, ctx.limit   who reads, who parks, the delivery limit
--   ctx.left                              messages this call may still deliver
--   ctx.out                               the reply (see read.lua): REPLY_HEAD places that
--                                         finish fills, then the deliveries
--   ctx.problems, ctx.aside,              the reply's other parts
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
--   src.gcap     x-group-max-in-flight (fair share's per-group cap) or nil; src.gate its
--                state in this call (lua/lib/fair.lua's fair_gate), src.gfull: it stopped
--                the staging (then, with room left in the call, the source counts as full,
--                unless src.dropped: the call set one of its entries aside, lua/lib/serve_rare.lua)
--   src.bytes    x-max-length-bytes: the bytes of its messages this call delivered or set
--                aside (they wait no more, lua/lib/bytes.lua), or nil without the argument
--   src.keyed    its key store exists (a staged message it moves may hold a unique key: its
--                key is re-pointed, lua/lib/serve_rare.lua); nil until a move looks
--   src.aging    x-priority-aging's state (lua/lib/aging.lua) when it has the argument,
--                false without; opened with src.rate
--   src.expired                           entries this call set aside past their TTL
--   src.rate     its limiter (lua/lib/rate.lua) when it has x-rate-limit, false without;
--                nil until a stream of it has work to serve (an idle queue pays nothing)
--   src.capped   the limiter let no more of it through in this call
--   src.cap      x-max-in-flight's room {room, served, pending, kept, exact}
--                (lua/lib/inflight.lua), set when opened (with src.rate): pending is the
--                group's pending entries then (counted when exact, else at most the kept
--                bound less what riding acks freed), room N less what was in flight then
--                (at most pending), kept the bound as read (nil: none); false without
--   src.unfiled  entries this call parked with ~unfiled (pending, never delivered), or nil
--   src.full     the in-flight limit let no more of it through in this call
--   src.freed    the entries the acks riding along freed of it (XACK's count; its flag is
--                looked at), or nil
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
local REPLY_HEAD = 5  -- ctx.out starts with the places of the reply's five parts (see read.lua)

-- The call's state (see the top of this file): CONSUMER reads up to COUNT messages, HOLDER
-- parks, LIMIT is the delivery limit.
local function new_context(consumer, count, holder, limit, bytes)
  return {consumer = consumer, left = count, holder = holder, limit = limit,
          out = {false, false, false, false, false},  -- REPLY_HEAD places, set by finish
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

-- The keys of the keyed acks that ride along (ARGV after the A pairs at FIRST: U, then U
-- (pair number, x-unique-key) pairs): stream index -> entry id -> key; or nil and what is
-- wrong (nothing written yet).
local function keyed_acks(first, a, u)
  local keyed, base = {}, first + 2 * a  -- ARGV[base] is U
  for j = 1, u do
    local p = tonumber(ARGV[base + 2 * j - 1])
    if p == nil or p < 1 or p > a or p % 1 ~= 0 then
      return nil, 'read: expected an ack pair number 1..' .. a .. ' at ARGV[' ..
                  (base + 2 * j - 1) .. ']'
    end
    local at = first + 2 * (p - 1)
    local k = math.abs(tonumber(ARGV[at]))
    keyed[k] = keyed[k] or {}
    keyed[k][ARGV[at + 1]] = ARGV[base + 2 * j]
  end
  return keyed
end

-- Ack the A (stream index, entry id) pairs in ARGV[FIRST..], by stream, as ack.lua does:
-- only those the consumer still owns (or trusts it owns: a negative index, see ack_pairs);
-- the others are counted per source in ctx.unsettled. A stream holding another type is a
-- problem of its source only. A source whose acks freed slots while its in-flight flag was
-- raised gets its marker back, as ack.lua does (docs/design.rst, "Global concurrency").
-- U > 0 keyed acks: the key of each such entry deleted here is released (or throttled) in
-- its source's key store, as ack.lua's mode "u" does (docs/design.rst, Unique keys). Returns
-- an error when ARGV does not say which acks there are (before any write), else nil.
local function ride_acks(ctx, of, first, a, u)
  local by, order, at = ack_pairs(first, #of, first + 2 * a - 1)
  local freed = {}  -- sources with slots freed, in order
  if not by then  -- before anything is written: the whole call fails, and says why
    return 'read: expected a stream index 1..' .. #of .. ' at ARGV[' .. at ..
           '] (negative: trusted)'
  end
  for _, i in ipairs(order) do  -- a fanout stream's entries are never deleted by an ack
    if of[i].shared then return 'read: an ack of fanout stream ' .. i .. ' cannot ride along' end
  end
  local keyed, wrong = nil, nil
  if u > 0 then
    keyed, wrong = keyed_acks(first, a, u)
    if wrong then return wrong end
  end
  for _, i in ipairs(order) do
    local src = of[i]
    local keys = keyed and keyed[i]
    local owned, lost, err = ackable(KEYS[i], src.group, ctx.consumer, by[i])
    if owned and keys then  -- the store's type before this stream's first write: another
      local bad = wrong_type(src.store, 'hash')  -- type, the acks go on, the keys stay
      if bad then
        ctx.problems[#ctx.problems + 1] = src.q
        ctx.problems[#ctx.problems + 1] = bad .. ' (keys of acked messages not released)'
        keys = nil
      end
    end
    if owned then
      if lost > 0 then ctx.unsettled[src.q] = (ctx.unsettled[src.q] or 0) + lost end
      local deleted = keys and {} or nil
      local ok, done = pcall(ack_ids, KEYS[i], src.group, owned, deleted)
      if not ok then
        err = tostring(done)
      elseif done > 0 then
        if not src.freed then freed[#freed + 1] = src end
        src.freed = (src.freed or 0) + done
      end
      if ok and keys then
        local level, items = string.match(KEYS[i], ':(%d+)$') or '0', {}
        for id, key in pairs(keys) do
          if key ~= '' and deleted[id] then items[#items + 1] = {key, level, id} end
        end
        if #items > 0 then
          lib_unique().unique_release(src.store, items, function()
            ctx.now = ctx.now or now_ms()
            return ctx.now
          end)
        end
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

local lib_serve_rare  -- the rarer phases (lua/lib/serve_rare.lua, lazy), built by need

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

-- Count entry FIELDS, just copied from one of SRC's streams, against the byte budget. Every
-- value of an entry Redis replies with is a string (a numeric loop: no call per field).
local function spend(ctx, src, fields)
  local size = 0
  if type(fields) == 'table' then
    for k = 1, #fields do size = size + #fields[k] end
  end
  ctx.bytes_left, ctx.copied = ctx.bytes_left - size, ctx.copied + 1
  if size > src.est then src.est = size end
end

-- Note in the reply's dues that source SRC's next delayed message is due in REL ms (-1:
-- none), and where (src.due_at: a rate limit's next slot may replace it).
local function note_due(ctx, src, rel)
  local dues = ctx.dues
  dues[#dues + 1], dues[#dues + 2] = src.q, rel
  src.due_at = #dues
end

-- The delayed messages of a source just opened: those due are moved (lua/lib/serve_rare.lua)
-- only where a walk looks or its ready index says it may hold some; else it has none, and
-- the reply's due time says so.
local function open_delayed(ctx, src)
  if src.walk or src.index[DELAYED] then return lib_serve_rare().promote_due(ctx, src) end
  note_due(ctx, src, -1)
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
        open_delayed(ctx, src)
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
  -- Message TTL: past its deadline, never handed out. An entry without one has one field; a
  -- publish writes the deadline third (m or r first), read in place: the lookup is the rule.
  local deadline = type(fields) == 'table' and fields[3] ~= nil
  if deadline then
    deadline = fields[3] == EXPIRES and tonumber(fields[4]) or deadline_of(fields)
  end
  if deadline and deadline <= clock(ctx) then
    if src.ttl > 0 then  -- an expiring queue's (x-expires): dropped, counted, not filed
      lib_serve_rare().drop_expired(ctx, src, i, id, fields)
      src.expired = src.expired + 1
    elseif not lib_serve_rare().set_aside(ctx, src, i, id, fields, EXPIRED, count - 1) then
      src.expired = src.expired + 1
    end
    return false
  end
  local payload = fields[1] == 'm' and fields[2] or field(fields, 'm')
  if payload == nil then
    local token = not src.shared and field(fields, 'r')
    if not token then
      lib_serve_rare().set_aside(ctx, src, i, id, fields, 'malformed: no m field', count)
      return false
    end
    local size, err = try('HSTRLEN', src.big, token)
    if err then
      redis.call('XCLAIM', KEYS[i], src.group, UNFILED, 0, id, 'JUSTID')  -- out of waiting
      src.unfiled = (src.unfiled or 0) + 1  -- still pending (the in-flight bound counts it)
      if src.bytes then src.bytes = src.bytes + lib_bytes().entry_bytes(fields, nil) end
      problem(ctx, src, src.big, err)
      return false
    end
    if size == 0 then
      lib_serve_rare().set_aside(ctx, src, i, id, fields, 'big message body missing: no ' ..
                                 token .. ' in ' .. src.big, count)
      return false
    end
    ctx.bytes_left = ctx.bytes_left - size
    if size > src.est then src.est = size end
    if src.bytes then src.bytes = src.bytes + size end
    payload = {token}
  elseif src.bytes then  -- x-max-length-bytes: it no longer waits (lua/lib/bytes.lua)
    src.bytes = src.bytes + #payload
  end
  local out, n = ctx.out, #ctx.out
  out[n + 1], out[n + 2], out[n + 3], out[n + 4] = i, id, count, payload
  ctx.left = ctx.left - 1
  return true
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

-- The limits of queue source SRC, read once per call when a stream of it first has work to
-- serve (an idle queue pays nothing): one HMGET of its arguments (all a queue without limits
-- pays), then the rate limiter's state (lua/lib/rate.lua) and what is in flight
-- (lua/lib/inflight.lua) only where it has those arguments. False on a problem (noted).
local function open_limits(ctx, src)
  local r, err = try('HMGET', src.args, RATE_LIMIT, RATE_BURST, MAX_IN_FLIGHT, PRIORITY_AGING,
                     'x-group-max-in-flight', 'x-max-length-bytes')
  if err then
    problem(ctx, src, src.args, err)
    return false
  end
  r = r or {}
  src.aging = false
  -- x-max-length-bytes: the bytes of its messages this call took out of waiting (delivered
  -- or set aside), taken off its count at the end (lua/lib/bytes.lua); no field otherwise,
  -- as for gcap below
  if r[6] then src.bytes = 0 end
  if r[5] then  -- fair share's per-group cap (lua/lib/fair.lua's fair_gate); no field
    -- otherwise: one more key in src costs a plain read a rehash of it
    src.gcap, err = inflight_max(r[5], 'x-group-max-in-flight')
    if err then
      problem(ctx, src, src.args, err)
      return false
    end
  end
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
    -- the kept bound of the pending entries, less what the acks riding in this call freed,
    -- while it leaves room for all the call may still deliver; else an exact count of what
    -- is in flight, the pending entries kept as the bound (lua/lib/inflight.lua). Only a
    -- limit met on an exact count stops the source: a bound's room covers the call.
    local bound = inflight_bound(src.counters)
    local n = bound and bound - (src.freed or 0)
    local pending, exact = n, not n or n < 0 or max - n < ctx.left
    if exact then
      local ferr, fkey
      n, pending, ferr, fkey = inflight_count(src.streams, src.group)
      if ferr then
        problem(ctx, src, fkey, ferr)
        return false
      end
    end
    src.cap = {room = max - n, served = 0, pending = pending, kept = bound, exact = exact}
  end
  return true
end

-- Serve stream I of an open source: the parts its ready index names (both parts when the
-- source is walked and the stream is not empty; always both for a fanout source).
local function serve_stream(ctx, src, i)
  local key, idx = KEYS[i], src.index
  src.visited[i] = true
  if idx and src.walk then
    local staged, serr = lib_serve_rare().fair_walk(src, key)
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
      if cap.room - cap.served <= 0 and cap.exact then src.full = true end
    end
    if room <= 0 then return end
    ctx.left = room
  end
  local gone = nil
  if not idx or idx[HELD .. key] then gone = lib_serve_rare().serve_held(ctx, src, i) end
  if gone == nil and ctx.left > 0 and (not idx or idx[key]) then
    gone = serve_fresh(ctx, src, i)
  end
  if gone == nil and idx and idx[FAIR .. key] and not idx[key] and not ctx.halted then
    gone = lib_serve_rare().serve_staged(ctx, src, i)
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
      if cap.served >= cap.room and cap.exact then src.full = true end
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
        local staged, serr = lib_serve_rare().fair_walk(src, KEYS[i])
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
-- one is always given back, and so is a walked one: a read carried by a wait walks a source
-- whose marker that wait may have popped). Why no wake-up is lost: docs/design.rst,
-- "Wake-ups" and "A wait carries its read".
local function finish_source(ctx, src)
  if src.state == nil then
    if src.mode == 'p' or src.mode == 'w' then
      local err = arm(src.wake, KEYS[src.streams[1]], src.ttl)
      if err then problem(ctx, src, src.wake, err) end
    end
    return src.failed and 'e' or '-'
  end
  if src.state == 'skip' then return '0' end
  local more = src.more
  if src.state == 'open' and src.index then more = save_index(ctx, src) or more end
  if src.state == 'broken' then  -- its index cannot be read: leave its marker be,
    if src.mode == 'p' or src.mode == 'w' then  -- but give a popped wake-up back
      local err = arm(src.wake, KEYS[src.streams[1]], src.ttl)
      if err then problem(ctx, src, src.wake, err) end
    end
    return 'e'
  end
  local err = nil
  -- x-group-max-in-flight stopped the staging, and the call had room left, so nothing else
  -- of the source was ready: limited too (its settles lower the flag as x-max-in-flight's),
  -- unless this call itself set an entry aside after (which may have freed a slot)
  if src.gfull and ctx.left > 0 and not ctx.halted and not src.dropped then src.full = true end
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
    local cap = src.cap
    if cap then  -- x-max-in-flight: the group's pending entries now, at most
      inflight_keep(src.counters, KEYS[src.streams[1]],
                    cap.pending + cap.served + (src.unfiled or 0), cap.kept)
    end
    if src.expired > 0 then
      local err = count_expired(src.counters, KEYS[src.streams[1]], src.expired)
      if err then problem(ctx, src, src.counters, err) end
    end
  end
  local status, unsettled = {}, {}
  for q = 1, #sources do
    local src = sources[q]
    status[q] = finish_source(ctx, src)
    if src.bytes then  -- x-max-length-bytes: what left waiting; 0 once nothing waits
      local at = src.due_at
      local dry = status[q] == '0' and src.state == 'open' and not (src.capped or src.full)
                  and at ~= nil and ctx.dues[at] == -1
      if dry then
        lib_bytes().bytes_reset(src.counters)
      else
        lib_bytes().bytes_add(src.counters, KEYS[src.streams[1]], -src.bytes)
      end
    end
    if ctx.unsettled[q] then
      unsettled[#unsettled + 1] = q
      unsettled[#unsettled + 1] = ctx.unsettled[q]
    end
  end
  local reply = ctx.out  -- the deliveries follow the head's places: nothing is copied
  reply[1], reply[2], reply[3], reply[4], reply[5] =
    table.concat(status), ctx.problems, ctx.aside, ctx.dues, unsettled
  return reply
end
