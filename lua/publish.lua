--[[ publish: append one message to a queue's stream and wake its consumers, or keep it delayed;
a queue with a length limit (x-max-length) refuses it or sets its head aside first; a queue
with x-deduplication-window stores a message whose id it stored within the window only once.

KEYS[1]   the stream of the message's priority level, e.g. ks:q:{celery}:3
KEYS[2]   the queue's wake marker (zset), ks:q:{celery}:wake
KEYS[3]   the queue's ready index (set), ks:q:{celery}:ready
KEYS[4]   the queue's arguments (hash), ks:q:{celery}:args: read once (HMGET)
KEYS[5]   the queue's dead-letter stream, ks:q:{celery}:dlq: drop-head's letters
KEYS[6]   the queue's delayed set, ks:q:{celery}:delayed
KEYS[7]   the queue's delayed messages, ks:q:{celery}:delayed:m
KEYS[8..7+L]  all the queue's streams, first level first (KEYS[8], ks:q:{celery}:0: while
          it exists, the queue does); only a limited queue's publish looks at the others,
          so a caller may send only the first (L > 1, no unique key: 9 keys in all) and gets
          the error NEEDKEYS, nothing written, when the queue has x-max-length
KEYS[8+L] the queue's id store (zset), ks:q:{celery}:dedup: only with x-deduplication-window
          (KEYS[9] when only the first stream is sent)
KEYS[9+L] with all the streams: the queue's counters (hash), ks:q:{celery}:counters: a
          publish x-overflow refused counts "refused", drop-head counts "overflowed"; with
          x-max-length-bytes field "waiting-bytes" is the bytes of the messages waiting
          (lua/lib/bytes.lua): a message stored adds its size, one drop-head or replace
          mode takes out its own
KEYS[#]   last, with a big message (ARGV[1] "r:<token>") and in every wide layout (all the
          streams sent): the queue's big messages (hash), ks:q:{celery}:big (x-max-length-bytes
          sizes the big messages drop-head or replace mode take out)
ARGV[1]   the message: Kombu's JSON envelope, stored as field "m"; or "r:<token>" for a big
          one, whose body the caller stored in KEYS[#] under the token (HSET in the same
          MULTI/EXEC, just before): its entry gets field "r" = token (a delayed one keeps
          "r:<token>" as its value), and every path that publishes nothing deletes the body
ARGV[2]   "1": routed through an exchange, publish only if the queue exists; "0": always
ARGV[3]   L, the number of the queue's streams
ARGV[4]   the consumer group (the queue's name); ARGV[5] the holder consumer (drop-head)
ARGV[6]   "1": delayed delivery on (KEYS[6..7] used); "0": off
ARGV[7]   the message's own TTL in ms (Kombu's expiration property), or "": none; with the
          queue's x-message-ttl, the lower one sets the deadline stamped on it (field "e")
ARGV[8]   optional, with ARGV[6] "1": due at "@<unix ms>" or "+<ms from now>"; "": now
ARGV[9]   with a due time in ARGV[8]: threshold in ms: a message due sooner is published now
ARGV[10]  optional, with ARGV[9]: a label for operators (Celery's task id), may be ""
ARGV[11]  optional (ARGV[8..10] then given, "" where unused): the message's deduplication id
ARGV[12]  optional (ARGV[8..11] then given, "" where unused): the message's unique key
          (x-unique-key); then KEYS[10+L] is the queue's key store (hash),
          ks:q:{celery}:unique, before the big hash
ARGV[13]  optional (ARGV[8..12] then given, "" where unused): the message's group (x-group,
          "" for the default group); then KEYS[10+L] is the key store (even when ARGV[12] is
          "") and KEYS[11+L] the queue's staging hash, ks:q:{celery}:fair. On a queue with
          x-fairness the message is staged there, in its group's FIFO, rather than appended
          (lua/lib/fair.lua): a read moves it into its stream when the rotation reaches its
          group. A delayed message is kept delayed, its group in the staging hash (field
          d:<member>), and staged when a read moves it; one with a unique key too, the key
          store naming the staged message (lua/lib/unique.lua). A call to a queue with
          x-fairness without ARGV[13] gets NEEDKEYS, nothing written
Reply:    the new entry id; "delayed:<member>" when kept until due; "staged" when staged
          (x-fairness); nil when ARGV[2] is "1" and the queue does not exist; "duplicate"
          when the queue has x-deduplication-window and stored a message with the id of
          ARGV[11] within it, or when a live message of the queue holds the key of ARGV[12]
          (nothing stored; docs/design.rst, Unique keys)
Errors:   "publish: expected ..." for another layout; "publish: bad due time"; "publish: no
          body" (a big message's token is not in KEYS[#]); "QUEUEFULL ..." (x-overflow
          reject-publish, or drop-head with nothing ready to set aside: nothing stored);
          "NEEDKEYS ..." (only the first stream sent to a queue with x-max-length or
          x-max-length-bytes: nothing stored; send the call again with them all);
          WRONGTYPE (nothing written: checked first, or the marker's ZADD undone)
Minimum Redis: 6.2. Cost: O(1) and one HMGET; O(log n) with n delayed messages; a limited
queue adds L XLENs and an HLEN (with x-fairness an HGET of KEYS[11+L]: they check those
keys' types) and, for drop-head when
full, three TYPEs and a few reads per level; a big
message adds a TYPE, an HSTRLEN and two PTTLs, and never passes through Lua; a TTL adds a
TIME and the field e; an id on a queue with x-deduplication-window O(log n) with n ids
remembered; a unique key O(1) or O(log n) (its holder looked at), and one stored adds an
HINCRBY of the store's count and, once in 16 keyed publishes, a PTTL (two on an expiring
queue), an HMGET and either a sweep step, while a cycle is under way (one to four HSCANs, 64
fields at most: an XPENDING of each delivered one, no command for one not delivered yet,
no entry copied), or the look that starts one: an HLEN of the store and the count a
length limit makes (lua/lib/unique_sweep.lua); its x-unique-mode and x-unique-ttl come in
the HMGET of the arguments every publish makes, and TIME only for a throttled key.
x-max-length-bytes adds an HGET and an HINCRBY of the counters, and only before refusing
for bytes a look at every level's next message, the delayed set's ZCARD and the staging
count (a count that drifted up heals there). Never trims.
See docs/design.rst (Wake-ups, The ready index, Delayed delivery, Big messages, Queue
arguments and limits, Message TTL, Duplicates, Unique keys, Fair share). A staged message
costs 4 hash commands (7 when its group joins the rotation: lua/lib/fair.lua; one is the
HDEL of a stale reverse field in the key store, lua/lib/unique.lua) and an SADD.
]]
--@include common
--@include delay
--@include limits
--@include bytes
--@include expiry
--@include dedup
--@include unique
--@include fair
--@include unique_sweep
local big = string.sub(ARGV[1] or '', 1, 2) == 'r:'  -- the body is in the big hash
local nk = #KEYS - (big and 1 or 0)
local nl = tonumber(ARGV[3] or '')
local keyed = #ARGV >= 12  -- a unique key: KEYS[10+L] its store (docs: Unique keys)
local grouped = #ARGV == 13  -- a group: KEYS[11+L] the staging hash (docs: Fair share)
-- the big hash ends a wide layout whatever the message: x-max-length-bytes sizes the big
-- messages that drop-head or replace mode takes out (lua/lib/bytes.lua)
local wide = nl ~= nil and nl >= 1
             and #KEYS == 10 + nl + (keyed and 1 or 0) + (grouped and 1 or 0)
local short = not wide and not keyed and nk == 9 and nl ~= nil and nl >= 1  -- see KEYS[8]
local bad = check_args('publish', wide or short,
                       #ARGV == 7 or ((#ARGV == 11 or keyed) and (ARGV[6] == '1' or ARGV[8] == ''))
                       or (ARGV[6] == '1' and ((#ARGV == 8 and ARGV[8] == '')
                                              or #ARGV == 9 or #ARGV == 10)),
                       '7 keys, the L streams, the id store and the counters (or the ' ..
                       'first stream and the id store; one more, the big hash, with ' ..
                       '"r:<token>"); 7 args, or with delayed delivery 8 to 10 (a due ' ..
                       'time needs ARGV[9]), or 11 with an id, 12 with a unique key (and ' ..
                       'its store), 13 with a group (and the store and the staging hash)')
if bad then return bad end
local stream, wake, ready, argkey, dlq = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local store, dedup_id = KEYS[wide and 8 + nl or 9], ARGV[11]
local counters = wide and KEYS[9 + nl]  -- refusals counted (a limited queue's layout)
if dedup_id == '' then dedup_id = nil end
local first = KEYS[8]
local streams = nil  -- all the queue's streams, only a limited queue's publish needs
local group, holder = ARGV[4], ARGV[5]
local dkey, bodies = nil, nil
if ARGV[6] == '1' then dkey, bodies = KEYS[6], KEYS[7] end
local expiration = tonumber(ARGV[7])  -- ms, nil: none
local due_arg, threshold, label = ARGV[8], ARGV[9], ARGV[10]
local payload, routed = ARGV[1], ARGV[2] == '1'
local bigkey, token = nil, nil
local bighash = (wide or big) and KEYS[#KEYS] or nil  -- the big hash, when given
local field_values = {'m', payload}  -- what the stream entry holds
local size = #payload  -- what it counts for against x-max-length-bytes
if big then
  bigkey, token = KEYS[#KEYS], string.sub(payload, 3)
  field_values = {'r', token}
  local wrong = wrong_type(bigkey, 'hash')  -- then the HSET before failed too: nothing to undo
  if wrong then return redis.error_reply(wrong) end
  size = redis.call('HSTRLEN', bigkey, token)
  if size == 0 then
    return redis.error_reply('publish: no body of big message ' .. token .. ' in ' .. bigkey)
  end
end

-- Every path that publishes nothing returns through here: a big message's body goes too,
-- so nothing is left in the big hash that no entry refers to.
local function refuse(reply)
  if big then redis.call('HDEL', bigkey, token) end
  return reply
end
-- Types before the first write (see wrong_type): a message appended before its marker or
-- index member failed would be appended again by the publisher's retry. On the common path
-- the marker's ZADD is the first write (it fails alone) and is undone if the XADD after it
-- fails; SMISMEMBER checks the index and ZRANGE the delayed set, reads the call needs
-- anyway; the marker and the delayed messages' hash are checked where a message is kept
-- delayed or a limit may set one aside first. A key this path never touches (the first
-- stream, only asked its TTL; the delayed keys of a queue whose index says it holds none) is
-- not looked at: no command per publish for it.
local wrong = nil
local marks, next_due = nil, nil  -- with KEYS[5..6]: {stream indexed, may hold delayed ones}
if dkey and not wrong then
  marks, wrong = try('SMISMEMBER', ready, stream, DELAYED)
  if marks and marks[2] == 1 then next_due, wrong = delay_next(dkey) end
elseif not dkey then
  wrong = wrong or wrong_type(ready, 'set')
end
if wrong then return refuse(redis.error_reply(wrong)) end

-- The length limit (docs/design.rst, "Queue arguments and limits"): everything the queue
-- holds counts, so what a publish adds (to a stream or the delayed set) is checked here,
-- before any write. The counts (XLEN, HLEN) check the types of the keys they read; drop-head
-- checks those it writes before it writes.
local limit, overflow, queue_ttl, window, fairness, umode, uconf, maxbytes
limit, overflow, wrong, queue_ttl, window, fairness, umode, uconf, maxbytes = read_limit(argkey)
if not wrong and fairness and not grouped then  -- staging needs its hash: ask for it
  return refuse(redis.error_reply('NEEDKEYS queue ' .. group .. ' has x-fairness: send its ' ..
                                  'staging hash and a group (nothing was stored)'))
end
if not wrong and (limit or maxbytes) and short then  -- a limit needs every stream
  return refuse(redis.error_reply('NEEDKEYS queue ' .. group .. ' has x-max-length' ..
                                  (limit and '' or '-bytes') .. ': send all its ' .. nl ..
                                  ' streams (nothing was stored)'))
end
local held = 0
if not wrong and limit then
  streams = {unpack(KEYS, 8, 7 + nl)}
  held, wrong = held_count(streams, KEYS[7])
  if not wrong and fairness then  -- staged messages count too (its HGET checks its type)
    local staged
    staged, wrong = try('HGET', KEYS[11 + nl], FAIR_COUNT)
    held = held and held + (tonumber(staged) or 0)
  end
end
local waiting = 0  -- x-max-length-bytes: the bytes the queue holds waiting (lua/lib/bytes.lua)
if not wrong and maxbytes then
  streams = streams or {unpack(KEYS, 8, 7 + nl)}
  waiting, wrong = lib_bytes().bytes_waiting(counters)
end
if wrong then return refuse(redis.error_reply(wrong)) end
local time = nil  -- the server's clock, read once: {seconds, microseconds}
local function now_us()
  if time == nil then time = redis.call('TIME') end
  return tonumber(time[1]), tonumber(time[2])
end
local function clock()  -- ms, rounded down
  local sec, usec = now_us()
  return sec * 1000 + math.floor(usec / 1000)
end
-- A duplicate (docs/design.rst, "Duplicates") is refused before the limit is looked at: a
-- retried publish to a full queue is no reason to set another message aside.
local dedup_now = nil  -- with an id to remember once the message is stored
if window and window > 0 and dedup_id then
  dedup_now = clock()
  local dedup = lib_dedup()
  local seen, err = dedup.dedup_seen(store, dedup_id, dedup_now)
  if err then return refuse(redis.error_reply(err)) end
  if seen then
    dedup.dedup_count(store)
    return refuse('duplicate')
  end
end
-- Called once the message is stored: its id is remembered. Built only when there is one to
-- remember (a closure with its upvalues is work for every call that builds it).
local remember = nil
if dedup_now then
  remember = function()
    lib_dedup().dedup_remember(store, dedup_id, dedup_now, window, argkey, first)
  end
end
-- Unique keys (docs/design.rst, "Unique keys"): a message whose x-unique-key a live message
-- of the queue holds is refused (a duplicate), or replaces that one while it waits
-- (x-unique-mode replace). After the id store: a retried publish is a duplicate first.
local ukey, ustore, ustate, uref, ua, ub, uttl = ARGV[12], nil, nil, nil, nil, nil, 0
local levels = {}  -- level -> stream
-- Fair share (docs/design.rst, "Fair share"): staged in its group's FIFO, not appended (a
-- delayed one when due), keyed or not: the key store then names the staged message.
local fair_key = grouped and fairness and KEYS[11 + nl] or nil
if ukey == '' then ukey = nil end
if ukey then
  ustore = KEYS[10 + nl]
  -- a level stream's name is "<queue's base>:<level>": the level starts where KEYS[8]'s 0
  for i = 8, 7 + nl do levels[string.sub(KEYS[i], #first)] = KEYS[i] end
  uttl = math.max(math.floor(tonumber(uconf) or 0), 0)  -- read with the limit (read_limit)
  local uerr
  local unique = lib_unique()
  ustate, uref, ua, ub, uerr = unique.unique_holder(ustore, ukey, levels, KEYS[6], group, clock,
                                                    fair_key)
  if not uerr and ustate and umode == 'replace' then
    local ok
    ok, uerr = unique.unique_replaceable(ustate, ua, KEYS[7], fair_key)
    if ok then ustate = 'replace ' .. ustate end
  end
  if uerr then return refuse(redis.error_reply(uerr)) end
  if ustate and string.sub(ustate, 1, 8) ~= 'replace ' then
    redis.call('HINCRBY', ustore, UNIQUE_COUNT, 1)
    return refuse('duplicate')
  end
end
-- Called once the message is stored (entry ID, delayed MEMBER, or staged at FIELD of the
-- staging hash): it holds the key now, and the one it replaces goes (after: no refusal can
-- follow, so nothing is lost). Built only for a message with a key.
local hold = nil
if ukey then
  hold = function(id, member, field)
    local unique = lib_unique()
    if ustate then
      unique.unique_drop(ustore, string.sub(ustate, 9), ua, ub, KEYS[6], KEYS[7], fair_key)
    end
    unique.unique_hold(ustore, ukey, uttl, string.sub(stream, #first), id, member, uref, field)
    local tick = unique.unique_count(ustore)
    if tick == nil or tick >= UNIQUE_EVERY then  -- fields outliving a message
      lib_unique_sweep().unique_sweep(ustore, levels, KEYS[6], KEYS[7], clock, group,
                                      fair_key)
    elseif tick == 1 then  -- a new store (or a count begun again): an expiring queue's goes
      local ttl = redis.call('PTTL', first)  -- with it
      if ttl > 0 and redis.call('PTTL', ustore) == -1 then redis.call('PEXPIRE', ustore, ttl) end
    end
  end
end
-- A routed publish to a queue that does not exist stores nothing (nil): asked (EXISTS) only
-- where a limit would refuse it or write first; the paths that store ask on their own.
local function gone() return routed and redis.call('EXISTS', first) == 0 end
if (limit or maxbytes) and dkey and due_arg and due_arg ~= ''
   and tonumber(string.sub(due_arg, 2)) == nil then  -- before drop-head sets any aside
  return refuse(redis.error_reply('publish: bad due time ' .. due_arg))
end
if maxbytes and size > maxbytes then  -- never stored, whatever waits
  if gone() then return refuse(false) end
  count_in(counters, first, 'refused', 1)
  return refuse(redis.error_reply('QUEUEFULL queue ' .. group .. ': a message of ' .. size ..
                                  ' bytes is over its x-max-length-bytes ' .. maxbytes ..
                                  '; the message was not stored'))
end
-- Replace mode: the message it replaces goes once this one is stored, so it counts against
-- neither limit, and drop-head never sets it aside
local rstate = ustate and string.sub(ustate, 9) or nil
local replaced = 0  -- its bytes (x-max-length-bytes)
if rstate then
  held = held - 1
  if maxbytes then
    replaced = lib_bytes().bytes_of_waiting(rstate, ua, ub, KEYS[7], fair_key, bighash)
  end
end
-- a count that drifted up heals: nothing waits, yet it says full (lua/lib/bytes.lua)
if maxbytes and waiting - replaced + size > maxbytes
   and lib_bytes().bytes_none_waiting(streams, group, holder, KEYS[6],
                                      fairness and grouped and KEYS[11 + nl]) then
  lib_bytes().bytes_reset(counters)
  waiting = 0
end
if (limit and held >= limit) or (maxbytes and waiting - replaced + size > maxbytes) then
  if gone() then return refuse(false) end
  local full = 'QUEUEFULL queue ' .. group .. ' is full: ' ..
               ((limit and held >= limit) and 'x-max-length ' .. limit or
                'x-max-length-bytes ' .. maxbytes) ..
               ' reached (x-overflow ' .. overflow .. '); the message was not stored'
  if overflow ~= 'drop-head' or (limit and limit < 1) then
    count_in(counters, first, 'refused', 1)  -- another type there: not counted, still refused
    return refuse(redis.error_reply(full))
  end
  -- what drop-head writes (the streams are checked by their counts), and the marker, which
  -- it then writes after the first write; the delayed set, which the message may go to
  wrong = wrong_type(dlq, 'stream') or wrong_type(wake, 'zset') or wrong_type(KEYS[6], 'zset')
  if wrong then return refuse(redis.error_reply(wrong)) end
  -- The heads to set aside, in serving order, until the message fits: one per publish, more
  -- (at most 100) after a limit was lowered at run time or for a message bigger than those
  -- ahead of it. Planned first: when the ready ones run out before it fits (the rest is in
  -- flight, delayed or staged), none goes, as setting them aside would not make room.
  local next_head = heads(streams, group, holder, rstate == 'ready' and ua or nil, ub)
  local plan, h, w = {}, held, waiting - replaced
  local function over() return (limit and h >= limit) or (maxbytes and w + size > maxbytes) end
  while over() and #plan < 100 do
    local s, id, fields, deliveries = next_head()
    if not s then break end
    plan[#plan + 1] = {s, id, fields, deliveries}
    h = h - 1
    if maxbytes then w = w - lib_bytes().entry_bytes(fields, bighash) end
  end
  if over() and #plan < 100 then
    count_in(counters, first, 'refused', 1)
    return refuse(redis.error_reply(full .. ': no ready message left to set aside (the ' ..
                                    'rest is in flight, delayed or staged)'))
  end
  for _, p in ipairs(plan) do
    local err = dead_letter(p[1], group, p[2], p[3], dlq, 'max-length', p[4], false)
    if err then return refuse(redis.error_reply(err)) end  -- the first: nothing changed
  end
  count_in(counters, first, 'overflowed', #plan)
  if maxbytes then lib_bytes().bytes_add(counters, first, w - (waiting - replaced)) end
  if over() then  -- at 100 (a lowered limit): those went, the publish is still refused
    count_in(counters, first, 'refused', 1)
    return refuse(redis.error_reply(full .. ': 100 messages set aside, more to go'))
  end
end

-- Message TTL (docs/design.rst, "Message TTL"): the deadline, from this call's clock, goes
-- with the message wherever it waits (field e of its entry, a prefix of its delayed value).
local deadline = nil
if queue_ttl or expiration then
  local sec, usec = now_us()
  deadline = deadline_at(sec, usec, queue_ttl, expiration)
end
if deadline then field_values[3], field_values[4] = EXPIRES, deadline end

-- Give keys this call made (marker, index, delayed keys; a big hash without an expiry) the
-- queue's expiry (x-expires).
local function expire_new(new)
  if big and redis.call('PTTL', bigkey) == -1 then new[#new + 1] = bigkey end
  local ttl = nil
  for _, key in ipairs(new) do
    if ttl == nil then ttl = redis.call('PTTL', first) end
    if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
  end
end

-- What keeps a message delayed: built only for a publish that may (a due time given, or
-- due messages of the queue not moved yet), not for every call.
local delayed_wrong, keep_delayed = nil, nil
if dkey and ((due_arg and due_arg ~= '') or next_due) then
  -- The delayed keys' types, checked before a path that writes them writes anything.
  delayed_wrong = function()
    local err = wrong_type(dkey, 'zset') or wrong_type(bodies, 'hash') or wrong_type(wake, 'zset')
    err = err or (fair_key and wrong_type(fair_key, 'hash'))
    return err and refuse(redis.error_reply(err))
  end

  keep_delayed = function(due)
    local sec, usec = now_us()
    local member, earliest = delay_store(dkey, bodies, string.match(stream, ':(%d+)$') or '0',
                                         label or '', with_deadline(payload, deadline), due,
                                         string.format('%010d%06d', sec, usec))
    local new = {}
    if redis.call('ZCARD', dkey) == 1 then new = {dkey, bodies} end
    if redis.call('SADD', ready, DELAYED) == 1 then new[#new + 1] = ready end
    -- a new earliest due time (or one due now): wake a consumer, whose read learns it
    if earliest and redis.call('ZADD', wake, 0, 'w') == 1 then new[#new + 1] = wake end
    if fair_key then  -- x-fairness: staged when due, in its group (docs: Fair share)
      redis.call('HSET', fair_key, 'd:' .. member, ARGV[13])
      if redis.call('PTTL', fair_key) == -1 then new[#new + 1] = fair_key end
    end
    expire_new(new)
    if remember then remember() end
    if hold then hold(nil, member) end
    if maxbytes then lib_bytes().bytes_add(counters, first, size - replaced) end  -- it waits
    return 'delayed:' .. member
  end
end

if dkey and due_arg and due_arg ~= '' then
  local mark, t = string.sub(due_arg, 1, 1), tonumber(string.sub(due_arg, 2))
  if t == nil then return refuse(redis.error_reply('publish: bad due time ' .. due_arg)) end
  local due = t
  if mark == '+' then  -- from now, rounded up to the ms: never due early
    local sec, usec = now_us()
    due = sec * 1000 + math.ceil(usec / 1000) + t
  end
  if due - clock() >= tonumber(threshold) then
    if routed and redis.call('EXISTS', first) == 0 then return refuse(false) end
    return delayed_wrong() or keep_delayed(due)
  end
end

if dkey then
  if next_due and next_due <= clock() then  -- due ones wait to be moved: queue up behind
    if routed and redis.call('EXISTS', first) == 0 then return refuse(false) end
    bad = delayed_wrong()
    if bad then return bad end
    if redis.call('ZADD', wake, 0, 'w') == 1 then expire_new({wake}) end
    return keep_delayed(clock())
  end
end
if fair_key then
  if routed and redis.call('EXISTS', first) == 0 then return refuse(false) end
  -- the marker first (fails alone), taken back if the staging's first write fails
  local woke, werr = try('ZADD', wake, 0, 'w')
  if werr then return refuse(redis.error_reply(werr)) end
  local value = payload
  if big then value = 'r:' .. token end
  local created, serr, field = lib_fair().fair_stage(fair_key,
                                                     string.match(stream, ':(%d+)$') or '0',
                                                     ARGV[13], with_deadline(value, deadline))
  if serr then
    if woke == 1 then redis.call('ZREM', wake, 'w') end
    return refuse(redis.error_reply(serr))
  end
  local new = {}
  if woke == 1 then new[#new + 1] = wake end
  if created then new[#new + 1] = fair_key end
  if redis.call('SADD', ready, FAIR .. stream) == 1 then new[#new + 1] = ready end
  expire_new(new)
  if remember then remember() end
  if hold then
    hold(nil, nil, field)
  else  -- a key's reverse field left at this name by a message gone behind our back goes
    redis.pcall('HDEL', KEYS[10 + nl], 'g:' .. field)  -- (lua/lib/unique.lua)
  end
  if maxbytes then lib_bytes().bytes_add(counters, first, size - replaced) end  -- it waits
  return 'staged'
end
local woke, wake_wrong = try('ZADD', wake, 0, 'w')  -- first write: fails alone
if wake_wrong then return refuse(redis.error_reply(wake_wrong)) end
local function unwake(reply)  -- nothing appended: the marker as it was, then refuse
  if woke == 1 then redis.call('ZREM', wake, 'w') end
  return refuse(reply)
end
local id, err = false, nil
if routed then
  id, err = try('XADD', stream, 'NOMKSTREAM', '*', unpack(field_values))
  if err then return unwake(redis.error_reply(err)) end
  if not id and redis.call('EXISTS', first) == 0 then return unwake(false) end
end
if not id then
  id, err = try('XADD', stream, '*', unpack(field_values))
  if err then return unwake(redis.error_reply(err)) end
end
local new = {}
if woke == 1 then new[#new + 1] = wake end
if marks == nil or marks[1] == 0 then
  if redis.call('SADD', ready, stream) == 1 then new[#new + 1] = ready end
end
expire_new(new)
if remember then remember() end
if hold then hold(id, nil) end
if maxbytes then lib_bytes().bytes_add(counters, first, size - replaced) end  -- it waits
return id
