--[[ reclaim: give back the messages of consumers that stopped, and leases that ran out.

KEYS[1..n]  the streams of ONE source: all streams of a queue (one per priority level), or
            one fanout stream (its group for the queue)
KEYS[n+1]   the source's wake marker (zset)
KEYS[n+2]   the queue's ready index (set); not given for a fanout stream
KEYS[n+3..n+4] optional, with KEYS[n+2]: the queue's arguments (hash) and delayed set,
            for retry backoff: with x-requeue-delay a message given back after n >= 1
            deliveries waits, parked with ~backoff (docs/design.rst, "Retry backoff"); one
            parked there whose lease ran out (its pointer went) goes to the holder at once
KEYS[n+5]   optional, with those: the queue's in-flight flag (string), ks:q:{queue}:capped:
            when raised (x-max-in-flight stopped a read with work left) and a message went
            back, the flag is lowered and the marker set (docs/design.rst, "Global
            concurrency")
KEYS[n+6..n+7] optional, with those: the queue's counters (hash) and big messages (hash):
            while the counters keep its waiting bytes (x-max-length-bytes,
            lua/lib/bytes.lua), each message a consumer held that goes back adds its size
ARGV[1]     consumer group (the queue's name)
ARGV[2]     name of the holder consumer that parks requeued messages
ARGV[3]     lease, ms (visibility_timeout): a message idle this long has lost its lease
ARGV[4]     budget: the most PEL entries this call moves or looks at, over all its streams
ARGV[5]     consumer expiry, ms: a consumer that owns nothing and was idle this long is
            removed from the group (0: never)
ARGV[6..]   one sweep cursor per stream: the sweep goes on after this id ("-": from the start)
Reply:      {moved, more, next_ms, cursor_1, ..., cursor_n}: messages given back; 1 when the
            budget ran out before every stopped consumer's messages were given back (call
            again); ms until the lease of a live consumer's message could run out at the
            earliest (-1: no consumer holds anything), so the caller need not look again
            before then; where the sweep goes on per stream ("-": it reached the end)
Errors:     "reclaim: expected ..." for another layout; WRONGTYPE (checked before any write)
Minimum Redis: 6.2 (exclusive ranges). Cost: O(n * consumers + budget): one XINFO CONSUMERS
per stream, then XPENDING and XCLAIM of at most budget entries in all; with backoff an HGET,
a TIME and an O(log n) store per message delayed; with the flag a TYPE (raised: a ZADD and
a DEL); with the waiting bytes kept an HEXISTS, an XRANGE of one id per message (at most
COPY_BYTES, 4 MiB, copied per call: then more is 1) and an HINCRBY.
Stopped consumers, the sweep and the holder: see docs/design.rst (Leases).
]]
--@include common
--@include delay
--@include inflight
--@include bytes
local n = #ARGV - 5
local bad = check_args('reclaim', #KEYS == n + 1 or #KEYS == n + 2 or #KEYS == n + 4 or
                       #KEYS == n + 5 or #KEYS == n + 7, n >= 1,
                       'KEYS: n streams, marker[, index[, arguments, delayed set[, flag[, ' ..
                       'counters, big messages]]]]; ' ..
                       'ARGV: 5 fixed, one cursor per stream')
if bad then return bad end
local group, holder = ARGV[1], ARGV[2]
local lease, budget, expiry = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local index = KEYS[n + 2]
-- every key is checked first (see wrong_type): a wrong type found after some messages were
-- given back would leave them parked without their index member and marker
local wrong = wrong_type(KEYS[n + 1], 'zset') or (index and wrong_type(index, 'set'))
wrong = wrong or wrong_streams(1, n)
local dkey = KEYS[n + 4]
local min_ms, max_ms = nil, nil  -- x-requeue-delay, when the queue has it
if dkey and not wrong then min_ms, max_ms, wrong = read_backoff(KEYS[n + 3], dkey) end
local flagged = false  -- x-max-in-flight stopped a read: a slot freed sets the marker
if KEYS[n + 5] and not wrong then flagged, wrong = inflight_flagged(KEYS[n + 5]) end
if wrong then return redis.error_reply(wrong) end

local moved, more, next_ms, held = 0, 0, -1, {}
local clock = nil  -- TIME, read once, when a message is to wait
-- x-max-length-bytes: a message a consumer held waits again, its size added (one waiting
-- out a backoff whose pointer went already counts: lua/lib/bytes.lua)
local sized = KEYS[n + 6] and lib_bytes().bytes_kept(KEYS[n + 6])
local added = 0
local COPY_BYTES = 4 * 1024 * 1024  -- most bytes of entries copied to size them, per call
local copied, sizes, cut = 0, {}, false  -- sizes: id -> its bytes; cut: the budget cut
-- Of the XPENDING records P of stream KEY, those whose entries fit what is left of the copy
-- budget (one at least while nothing was copied; those of BACKOFF count already and are
-- not copied), each sized; the rest is left for the next call (more).
local function within_copy(key, p)
  if not sized then return p end
  local kept = {}
  for _, e in ipairs(p) do
    if e[2] ~= BACKOFF then
      if copied >= COPY_BYTES then
        more, cut = 1, true
        break
      end
      local entry = redis.call('XRANGE', key, e[1], e[1])[1]
      local bytes = 0
      if entry then
        for _, v in ipairs(entry[2]) do copied = copied + #v end
        bytes = lib_bytes().entry_bytes(entry[2], KEYS[n + 7])
      end
      sizes[e[1]] = bytes
    end
    kept[#kept + 1] = e
  end
  return kept
end
local function count_back(id)
  if sized and sizes[id] then added = added + sizes[id] end
end

-- Retry backoff: park the ids of stream KEY (XPENDING records P, idle a whole lease) that
-- their delivery count says must wait with BACKOFF, each pointed to from the delayed set.
-- Returns the ids left to give back to the holder, and how many were parked.
local function wait(key, p)
  local rest, parked = {}, 0
  for _, e in ipairs(p) do
    local delay = 0
    if min_ms and e[2] ~= BACKOFF then delay = backoff_ms(tonumber(e[4]), min_ms, max_ms) end
    if delay <= 0 then
      rest[#rest + 1] = e[1]
    elseif redis.call('XCLAIM', key, group, BACKOFF, lease, e[1], 'JUSTID')[1] then
      count_back(e[1])  -- from a consumer (never BACKOFF's own: see above)
      clock = clock or redis.call('TIME')
      local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
      park_pointer(dkey, index, KEYS[n + 1], key, string.match(key, ':(%d+)$') or '0',
                   e[1], holder, group, now + delay,
                   string.format('%010d%06d', tonumber(clock[1]), tonumber(clock[2])))
      parked = parked + 1
    end
  end
  moved = moved + parked
  return rest, parked
end

-- Give the XPENDING records P of stream KEY back to the holder (or, with backoff, to the
-- delayed set), if they are still idle for a whole lease. Returns how many went.
local function give_back(key, p)
  p = within_copy(key, p)
  local ids, parked = wait(key, p)
  if #ids == 0 then return parked end
  local args = {key, group, holder, lease}
  for _, id in ipairs(ids) do args[#args + 1] = id end
  args[#args + 1] = 'JUSTID'  -- unpack() must come last to expand fully
  local claimed = redis.call('XCLAIM', unpack(args))
  local got = #claimed
  for _, id in ipairs(claimed) do count_back(id) end  -- BACKOFF's have no size: counted
  if got > 0 then
    moved = moved + got
    held[#held + 1] = HELD .. key
  end
  return got + parked
end

local alive = {}  -- stream index -> true when it has the group
for i = 1, n do
  local key = KEYS[i]
  local list, err = try('XINFO', 'CONSUMERS', key, group)
  if err and string.find(err, 'no such key', 1, true) then list, err = nil, nil end
  if err then return redis.error_reply(err) end
  alive[i] = list ~= nil
  for _, c in ipairs(list or {}) do
    local name = field(c, 'name')
    local pending, idle = tonumber(field(c, 'pending')), tonumber(field(c, 'idle'))
    if name == holder or name == BACKOFF or name == nil then
      -- parked messages have no lease; one waiting with BACKOFF whose pointer went is found
      -- by the sweep below, entry by entry (its consumer's idle time says nothing of it)
    elseif pending > 0 and idle >= lease then
      if budget > 0 then
        local ids = redis.call('XPENDING', key, group, '-', '+', budget, name)
        budget = budget - #ids
        local got = give_back(key, ids)
        if #ids < pending then
          more = 1
        elseif got == pending and expiry > 0 and idle >= expiry then
          redis.call('XGROUP', 'DELCONSUMER', key, group, name)  -- owns nothing now
        end
      else
        more = 1
      end
    elseif pending > 0 then
      if next_ms < 0 or lease - idle < next_ms then next_ms = lease - idle end
    elseif expiry > 0 and idle >= expiry then
      redis.call('XGROUP', 'DELCONSUMER', key, group, name)
    end
  end
end

-- the sweep: one page per stream, sharing what is left of the budget
local cursors, page = {}, math.floor(budget / n)
if budget > 0 and page == 0 then page = 1 end  -- a budget below the stream count still sweeps
for i = 1, n do
  local key, cursor = KEYS[i], ARGV[5 + i]
  if not alive[i] then
    cursor = '-'
  elseif page > 0 then
    local start = cursor == '-' and '-' or '(' .. cursor
    local entries = redis.call('XPENDING', key, group, start, '+', page)
    local stale = {}
    for _, p in ipairs(entries) do
      -- one waiting with BACKOFF is due within max_ms of its parking: only one idle past
      -- that and a lease lost its pointer (purge, cancel); never one that is still waiting
      local idle = p[2] == BACKOFF and lease + (max_ms or 0) or lease
      if p[2] ~= holder and tonumber(p[3]) >= idle then stale[#stale + 1] = p end
    end
    local was_cut = cut
    give_back(key, stale)
    if not cut or was_cut then  -- else the copy budget cut it: this page again next call
      cursor = #entries >= page and entries[#entries][1] or '-'
    end
  end
  cursors[i] = cursor
end

if #held > 0 then  -- given back to the holder (those waiting made their own marks)
  if index then index_add(index, KEYS[1], unpack(held)) end
  arm(KEYS[n + 1], KEYS[1])
end
if flagged and moved > 0 then inflight_release(KEYS[n + 5], KEYS[n + 1], KEYS[1], 0) end
if added > 0 then lib_bytes().bytes_add(KEYS[n + 6], KEYS[1], added) end
local reply = {moved, more, next_ms}
for i = 1, n do reply[i + 3] = cursors[i] end
return reply
