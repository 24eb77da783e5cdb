--[[ publish: append one message to a queue's stream and wake its consumers, or keep it in
the queue's delayed set until it is due.

KEYS[1]   the stream of the message's priority level, e.g. ks:q:{celery}:3
KEYS[2]   the queue's wake marker (zset), ks:q:{celery}:wake
KEYS[3]   the queue's first stream (level 0), ks:q:{celery}:0: while it exists, the queue does
KEYS[4]   the queue's ready index (set), ks:q:{celery}:ready (see lua/lib/common.lua)
KEYS[5]   optional: the queue's delayed set, ks:q:{celery}:delayed (see lua/lib/delay.lua)
KEYS[6]   optional: the queue's delayed messages, ks:q:{celery}:delayed:m
ARGV[1]   the message: Kombu's JSON envelope, stored as field "m"
ARGV[2]   "1" when routed through an exchange: publish only if the queue exists (a copy must
          not bring back a deleted or expired queue); "0" for the default exchange
ARGV[3]   optional, with KEYS[5..6]: when it is due: "@<ms>" at unix ms, "+<ms>" in ms from
          now; "" or absent: now
ARGV[4]   with ARGV[3]: threshold in ms: a message due sooner is published now
ARGV[5]   with ARGV[3]: a label for operators (Celery's task id), may be ""
Reply:    the new entry id; or "delayed:<member>" when kept until due; or nil when the queue
          does not exist and ARGV[2] is "1"
Why here: the marker is set in the same call as the XADD, so no consumer sees one without
the other (the no-lost-wake-up argument, kombu_streams/poller.py). With KEYS[5..6], while
delayed messages are due and not yet moved (read.lua moves them), a message published now
joins them in the delayed set, due now, so it never overtakes one that was due before it.
Never trims. Minimum Redis: 6.2. Cost: O(1); O(log n) in a queue holding n delayed messages.
]]
--@include common
--@include delay
if #KEYS ~= 4 and #KEYS ~= 6 then return redis.error_reply('publish: needs 4 or 6 keys') end
local stream, wake, first, ready = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local dkey, bodies = KEYS[5], KEYS[6]
local payload, routed = ARGV[1], ARGV[2] == '1'
local time = nil  -- the server's clock, read once: {seconds, microseconds}
local function now_us()
  if time == nil then time = redis.call('TIME') end
  return tonumber(time[1]), tonumber(time[2])
end
local function clock()  -- ms, rounded down
  local sec, usec = now_us()
  return sec * 1000 + math.floor(usec / 1000)
end

-- Give newly made members of the marker and the index the queue's expiry (x-expires); ones
-- that exist have it already (every script that sets them gives it, touch.lua refreshes it).
local function expire_new(...)
  local ttl = nil
  for _, key in ipairs({...}) do
    if ttl == nil then ttl = redis.call('PTTL', first) end
    if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
  end
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
  expire_new(unpack(new))
  return 'delayed:' .. member
end

if dkey and ARGV[3] and ARGV[3] ~= '' then
  local mark, t = string.sub(ARGV[3], 1, 1), tonumber(string.sub(ARGV[3], 2))
  if t == nil then return redis.error_reply('publish: bad due time ' .. ARGV[3]) end
  local due = t
  if mark == '+' then  -- from now, rounded up to the ms: never due early
    local sec, usec = now_us()
    due = sec * 1000 + math.ceil(usec / 1000) + t
  end
  if due - clock() >= tonumber(ARGV[4]) then
    if routed and redis.call('EXISTS', first) == 0 then return false end
    return keep_delayed(due)
  end
end

local marks = nil  -- with KEYS[5..6]: {stream in the index, queue may hold delayed ones}
if dkey then
  marks = redis.call('SMISMEMBER', ready, stream, DELAYED)
  local next_due = marks[2] == 1 and delay_next(dkey)
  if next_due and next_due <= clock() then  -- due ones wait to be moved: queue up behind
    if routed and redis.call('EXISTS', first) == 0 then return false end
    if redis.call('ZADD', wake, 0, 'w') == 1 then expire_new(wake) end
    return keep_delayed(clock())
  end
end
local id = false
if routed then
  id = redis.call('XADD', stream, 'NOMKSTREAM', '*', 'm', payload)
  if not id and redis.call('EXISTS', first) == 0 then return false end
end
if not id then id = redis.call('XADD', stream, '*', 'm', payload) end
local new = {}
if redis.call('ZADD', wake, 0, 'w') == 1 then new[#new + 1] = wake end
if marks == nil or marks[1] == 0 then
  if redis.call('SADD', ready, stream) == 1 then new[#new + 1] = ready end
end
expire_new(unpack(new))
return id
