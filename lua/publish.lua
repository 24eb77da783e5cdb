--[[ publish: append one message to a queue's stream and wake its consumers, or keep it delayed.

KEYS[1]   the stream of the message's priority level, e.g. ks:q:{celery}:3
KEYS[2]   the queue's wake marker (zset), ks:q:{celery}:wake
KEYS[3]   the queue's first stream, ks:q:{celery}:0: while it exists, the queue does
KEYS[4]   the queue's ready index (set), ks:q:{celery}:ready
KEYS[5]   optional (delayed delivery on): the queue's delayed set, ks:q:{celery}:delayed
KEYS[6]   with KEYS[5]: the queue's delayed messages, ks:q:{celery}:delayed:m
KEYS[#]   last, only with a big message (ARGV[1] "r:<token>"): the queue's big messages
          (hash), ks:q:{celery}:big
ARGV[1]   the message: Kombu's JSON envelope, stored as field "m"; or "r:<token>" for a big
          one, whose body the caller stored in KEYS[#] under the token (HSET in the same
          MULTI/EXEC, just before): its entry gets field "r" = token (a delayed one keeps
          "r:<token>" as its value), and every path that publishes nothing deletes the body
ARGV[2]   "1": routed through an exchange, publish only if the queue exists; "0": always
ARGV[3]   optional, with KEYS[5..6]: due at "@<unix ms>" or "+<ms from now>"; "" or absent: now
ARGV[4]   with a due time in ARGV[3]: threshold in ms: a message due sooner is published now
ARGV[5]   optional, with ARGV[4]: a label for operators (Celery's task id), may be ""
Reply:    the new entry id; "delayed:<member>" when kept until due; nil when ARGV[2] is "1"
          and the queue does not exist
Errors:   "publish: expected ..." for another layout; "publish: bad due time"; "publish: no
          body" (a big message's token is not in KEYS[#]); WRONGTYPE (checked before any
          write)
Minimum Redis: 6.2. Cost: O(1); O(log n) with n delayed messages; a big message adds two
TYPEs, an HEXISTS and two PTTLs, and never passes through Lua. Never trims.
See docs/design.rst (Wake-ups, The ready index, Delayed delivery, Big messages).
]]
--@include common
--@include delay
local big = string.sub(ARGV[1] or '', 1, 2) == 'r:'  -- the body is in the big hash
local nk = #KEYS - (big and 1 or 0)
local bad = check_args('publish', nk == 4 or nk == 6,
                       #ARGV == 2 or (nk == 6 and #ARGV <= 5 and (#ARGV >= 4 or ARGV[3] == '')),
                       '4 or 6 keys (one more, the big hash, with "r:<token>"); 2 args, or ' ..
                       'with 6 keys 3 to 5 (a due time needs ARGV[4])')
if bad then return bad end
local stream, wake, first, ready = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local dkey, bodies = nil, nil
if nk == 6 then dkey, bodies = KEYS[5], KEYS[6] end
local payload, routed = ARGV[1], ARGV[2] == '1'
local bigkey, token = nil, nil
local field_name, value = 'm', payload  -- what the stream entry holds
if big then
  bigkey, token = KEYS[#KEYS], string.sub(payload, 3)
  field_name, value = 'r', token
  local wrong = wrong_type(bigkey, 'hash')  -- then the HSET before failed too: nothing to undo
  if wrong then return redis.error_reply(wrong) end
  if redis.call('HEXISTS', bigkey, token) == 0 then
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
-- index member failed would be appended again by the publisher's retry. XADD is the first
-- write (it fails alone); SMISMEMBER checks the index and ZRANGE the delayed set, reads the
-- call needs anyway; the delayed messages' hash is checked where a message is kept there.
-- A key this path never touches (the first stream, only asked its TTL; the delayed keys of
-- a queue whose index says it holds none) is not looked at: no command per publish for it.
local wrong = wrong_type(wake, 'zset')
local marks, next_due = nil, nil  -- with KEYS[5..6]: {stream indexed, may hold delayed ones}
if dkey and not wrong then
  marks, wrong = try('SMISMEMBER', ready, stream, DELAYED)
  if marks and marks[2] == 1 then next_due, wrong = delay_next(dkey) end
elseif not dkey then
  wrong = wrong or wrong_type(ready, 'set')
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

-- The delayed keys' types, checked before a path that writes them writes anything.
local function delayed_wrong()
  local err = wrong_type(dkey, 'zset') or wrong_type(bodies, 'hash')
  return err and refuse(redis.error_reply(err))
end

local function keep_delayed(due)
  local sec, usec = now_us()
  local member, earliest = delay_store(dkey, bodies, string.match(stream, ':(%d+)$') or '0',
                                       ARGV[5] or '', payload, due,
                                       string.format('%010d%06d', sec, usec))
  local new = {}
  if redis.call('ZCARD', dkey) == 1 then new = {dkey, bodies} end
  if redis.call('SADD', ready, DELAYED) == 1 then new[#new + 1] = ready end
  -- a new earliest due time (or one due now): wake a consumer, whose read learns it
  if earliest and redis.call('ZADD', wake, 0, 'w') == 1 then new[#new + 1] = wake end
  expire_new(new)
  return 'delayed:' .. member
end

if dkey and ARGV[3] and ARGV[3] ~= '' then
  local mark, t = string.sub(ARGV[3], 1, 1), tonumber(string.sub(ARGV[3], 2))
  if t == nil then return refuse(redis.error_reply('publish: bad due time ' .. ARGV[3])) end
  local due = t
  if mark == '+' then  -- from now, rounded up to the ms: never due early
    local sec, usec = now_us()
    due = sec * 1000 + math.ceil(usec / 1000) + t
  end
  if due - clock() >= tonumber(ARGV[4]) then
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
local id = false
if big then  -- XADD would fail alone, but after the body's HSET: refuse (and undo it) first
  local wrong_stream = wrong_type(stream, 'stream')
  if wrong_stream then return refuse(redis.error_reply(wrong_stream)) end
end
if routed then
  id = redis.call('XADD', stream, 'NOMKSTREAM', '*', field_name, value)
  if not id and redis.call('EXISTS', first) == 0 then return refuse(false) end
end
if not id then id = redis.call('XADD', stream, '*', field_name, value) end
local new = {}
if redis.call('ZADD', wake, 0, 'w') == 1 then new[#new + 1] = wake end
if marks == nil or marks[1] == 0 then
  if redis.call('SADD', ready, stream) == 1 then new[#new + 1] = ready end
end
expire_new(new)
return id
