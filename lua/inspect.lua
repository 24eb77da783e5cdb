--[[ inspect: a read-only snapshot of ONE queue, for operator tools (kombu-streams status).

KEYS[1..n]    all streams of ONE queue (one per priority level)
KEYS[n+1]     the queue's dead-letter stream, ks:q:{name}:dlq
KEYS[n+2]     the queue's delayed set, ks:q:{name}:delayed
KEYS[n+3]     the queue's arguments (hash), ks:q:{name}:args
KEYS[n+4]     the queue's counters (hash), ks:q:{name}:counters
KEYS[n+5]     the queue's key store (hash), ks:q:{name}:unique: its count of publishes
              refused because their x-unique-key was taken (field "n")
KEYS[n+6]     the queue's rate limiter state (string), ks:q:{name}:rate
KEYS[n+7]     the queue's staging hash, ks:q:{name}:fair (x-fairness): its count of staged
              messages (field "n"), and per level the groups waiting (lua/lib/fair.lua)
ARGV[1]       consumer group (the queue's name)
ARGV[2]       name of the holder consumer that parks requeued messages
ARGV[3..n+2]  the priority level of each stream, in KEYS order
Reply:        {levels, dlq length, now, delayed, next due, arguments, counters, unique
              refused, in flight, in-flight limit, rate tokens, rate next, staged, groups}:
              now is the server's clock in unix ms (TIME); delayed the number of delayed
              messages and of retries waiting with x-requeue-delay (ZCARD of the delayed
              set), next due the ms until the earliest of them is due (0: due, not moved
              yet; -1: none);
              arguments the queue's recorded arguments, flat {name, value, ...} (HGETALL of
              a hash only declare.lua and limits.lua write: a few fields), counters its
              counters, flat (HGETALL: expired, ...); unique refused the key store's count
              (HGET; 0 without a store: docs/design.rst, Unique keys); in flight the
              messages x-max-in-flight counts now and in-flight limit its value; rate tokens
              the deliveries x-rate-limit lets through now and rate next the ms until it
              lets one through (0: now); each pair -1 without its argument or with a value
              the reads refuse (docs/design.rst, Global concurrency, Global rate limit);
              staged (the staging hash's count, 0 without one), groups (per stream in
              KEYS order {complete, group, waiting, ...}: the groups of its level's rotation,
              at most GROUPS_MAX (1,000) of them from the next in turn; complete 1 when that
              is all); and
              levels holds one record per stream, in KEYS order:
              {level, exists, length, ready, held, pending, oldest, consumers, last}
                exists     1 if the stream exists, else 0
                length     XLEN
                ready      messages not delivered yet: entries after the group's
                           last-delivered id, plus those parked with the holder
                held       of the ready ones, those parked with the holder (requeued or
                           reclaimed, served first)
                pending    delivered and not acked yet (the PEL without the holder and
                           without retries waiting with x-requeue-delay, parked with
                           ~backoff: those count as delayed, by their pointers)
                oldest     age in ms of the oldest ready message (from the ms part of its
                           entry id, against TIME), or -1 when none is ready
                consumers  flat {name, pending, idle ms, ...}, the holder and ~backoff
                           left out
                last       the group's last-delivered id ("" when there is no group yet:
                           then every entry is ready)
Errors:       "inspect: expected ..." for another layout; WRONGTYPE
Minimum Redis: 6.2 (exclusive XRANGE). Cost: O(n + consumers) commands, each reading at most
one entry (ready = XLEN - PEL size + held); with x-max-in-flight one XPENDING summary more per
stream, as a read counts; with x-rate-limit a GET; with x-fairness an HGET per group waiting,
at most GROUPS_MAX per level. Read-only: "--@flags no-writes" below makes it
run with EVALSHA_RO on Redis 7.0+ (Script.call_ro). See docs/design.rst (Leases).
]]
--@flags no-writes
--@include common
--@include delay
--@include unique
--@include inflight
--@include rate
--@include fair
local GROUPS_MAX = 1000  -- groups walked per level (one HGET each)
local bad = check_args('inspect', #KEYS >= 8, #ARGV == #KEYS - 5,
                       'KEYS: n streams, dlq, delayed set, arguments, counters, key store, ' ..
                       'rate, staging hash; ARGV: group, holder, n levels')
if bad then return bad end
local n = #KEYS - 7
local group, holder = ARGV[1], ARGV[2]
local now = now_ms()

-- Age in ms of the entry with id ID (its ms part against TIME), or -1 for no entry.
local function age(id)
  if not id then return -1 end
  local ms = tonumber(string.match(id, '^(%d+)'))
  if ms >= now then return 0 end
  return now - ms
end

-- The first entry id of XRANGE KEY START +, or nil.
local function first_after(key, start)
  local r = redis.call('XRANGE', key, start, '+', 'COUNT', 1)
  if r[1] then return r[1][1] end
  return nil
end

-- The older of two ids (either may be nil).
local function older(a, b)
  if a == nil then return b end
  if b == nil then return a end
  if id_before(b, a) then return b end
  return a
end

local function level_record(key, level)
  if redis.call('EXISTS', key) == 0 then
    return {level, 0, 0, 0, 0, 0, -1, {}, ''}
  end
  local length = redis.call('XLEN', key)
  local last, info = last_delivered(key, group)
  if info == nil then  -- published before any consumer declared the queue
    return {level, 1, length, length, 0, 0, age(first_after(key, '-')), {}, ''}
  end
  local pel = tonumber(field(info, 'pending'))
  local held, waiting, consumers = 0, 0, {}
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', key, group)) do
    local name, owns = field(c, 'name'), tonumber(field(c, 'pending'))
    if name == holder then
      held = owns
    elseif name == BACKOFF then  -- retries waiting: counted by their pointers, as delayed
      waiting = owns
    else
      consumers[#consumers + 1] = name
      consumers[#consumers + 1] = owns
      consumers[#consumers + 1] = tonumber(field(c, 'idle'))
    end
  end
  local oldest = first_after(key, '(' .. last)
  if held > 0 then
    local parked = redis.call('XPENDING', key, group, '-', '+', 1, holder)
    if parked[1] then oldest = older(oldest, parked[1][1]) end
  end
  return {level, 1, length, length - pel + held, held, pel - held - waiting, age(oldest),
          consumers, last}
end

local levels, groups = {}, {}
for i = 1, n do
  levels[i] = level_record(KEYS[i], tonumber(ARGV[2 + i]))
  local fair = lib_fair()
  local waiting, complete = fair.fair_groups(KEYS[n + 7], fair.fair_level(KEYS[i]), GROUPS_MAX)
  table.insert(waiting, 1, complete and 1 or 0)
  groups[i] = waiting
end
local first = redis.call('ZRANGE', KEYS[n + 2], 0, 0, 'WITHSCORES')
local next_due = -1
if first[1] then next_due = math.max(tonumber(first[2]) - now, 0) end
local arguments = redis.call('HGETALL', KEYS[n + 3])
local given = {}
for i = 1, #arguments, 2 do given[arguments[i]] = arguments[i + 1] end

-- The queue's limits as a read would apply them now, with the read's own helpers: the count
-- of lua/lib/inflight.lua and the GCRA of lua/lib/rate.lua (its state read, never written).
-- A value the reads refuse (written by another program) shows as none: status shows it as
-- stored, and the reads report it.
local in_flight, cap = -1, given[MAX_IN_FLIGHT] and inflight_max(given[MAX_IN_FLIGHT]) or -1
if cap >= 1 then
  local streams = {}
  for i = 1, n do streams[i] = i end
  local count, _, err = inflight_count(streams, group)
  if err then return redis.error_reply(err) end
  in_flight = count
end
local tokens, next_slot = -1, -1
local rate, rerr, rkey = lib_rate().rate_open(given[RATE_LIMIT], given[RATE_BURST], KEYS[n + 3],
                                              KEYS[n + 6], function() return now end)
if rerr and rkey == KEYS[n + 6] then return redis.error_reply(rerr) end
if rate then
  tokens, next_slot = rate.allow, 0
  if tokens <= 0 then next_slot = lib_rate().rate_next(rate, now) end
end

return {levels, redis.call('XLEN', KEYS[n + 1]), now, redis.call('ZCARD', KEYS[n + 2]), next_due,
        arguments, redis.call('HGETALL', KEYS[n + 4]),
        tonumber(redis.call('HGET', KEYS[n + 5], UNIQUE_COUNT) or '0') or 0,
        in_flight, cap, tokens, next_slot,
        tonumber(redis.call('HGET', KEYS[n + 7], 'n') or '0') or 0, groups}
