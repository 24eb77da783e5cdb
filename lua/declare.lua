--[[ declare: create a queue: one stream per priority level, each with the queue's group; record
its arguments (x-max-length...) or check them against those recorded.

KEYS[1..n]  all streams of ONE queue (one per priority level)
KEYS[n+1]   the queue's arguments (hash), ks:q:{celery}:args
ARGV[1]     consumer group (the queue's name)
ARGV[2..]   the declare's queue arguments as field, value pairs, in a fixed order (those
            kombu_streams/limits.py stores); none: the declare takes whatever is recorded
Reply:      number of streams that got the group in this call (0 when the queue existed)
Errors:     "declare: expected ..." for another layout; "PRECONDITION declare: ..." when the
            queue has other arguments recorded (naming both; nothing written); WRONGTYPE
            (checked before any write)
Minimum Redis: 6.2. Cost: O(n + arguments). Idempotent; the group starts at id 0, so
messages published before the first declare are delivered. See docs/design.rst (Key layout,
Queue arguments and limits).
]]
--@include common
local bad = check_args('declare', #KEYS >= 2, #ARGV >= 1 and #ARGV % 2 == 1,
                       'KEYS: streams, arguments hash; ARGV: group, field value pairs')
if bad then return bad end
local n, argkey = #KEYS - 1, KEYS[#KEYS]

-- True when KEY is a stream that has GROUP already: then nothing is written, so a consumer
-- can declare its queue (and drain it) while Redis is at maxmemory.
local function has_group(key, group)
  if redis.call('TYPE', key)['ok'] ~= 'stream' then return false end
  local _, info = last_delivered(key, group)
  return info ~= nil
end

-- "f=v f=v" of a flat {f, v, ...} list, sorted by field, for comparing and for the error
local function spell(flat)
  local parts = {}
  for i = 1, #flat, 2 do parts[#parts + 1] = flat[i] .. '=' .. flat[i + 1] end
  table.sort(parts)
  return table.concat(parts, ' ')
end

-- every key is checked first (see wrong_type): no queue with some of its levels only
local wrong = wrong_streams(1, n) or wrong_type(argkey, 'hash')
if wrong then return redis.error_reply(wrong) end
local given = {unpack(ARGV, 2)}
local record = false  -- the arguments are recorded by this call
if #given > 0 then
  local stored = redis.call('HGETALL', argkey)
  if #stored == 0 then
    record = true
  elseif spell(stored) ~= spell(given) then
    return redis.error_reply('PRECONDITION declare: queue ' .. ARGV[1] .. ' has arguments ' ..
                             spell(stored) .. ' in Redis; this declare gives ' ..
                             spell(given) .. ' (nothing changed)')
  end
end
local created = 0
for i = 1, n do
  local key = KEYS[i]
  if not has_group(key, ARGV[1]) then
    local err = pcall_error(redis.pcall('XGROUP', 'CREATE', key, ARGV[1], '0', 'MKSTREAM'))
    if err == nil then
      created = created + 1
    elseif not string.find(err, 'BUSYGROUP', 1, true) then
      return redis.error_reply(err)
    end
  end
end
if record then  -- with the queue's expiry (x-expires), as its other keys
  redis.call('HSET', argkey, unpack(given))
  expire_as(argkey, KEYS[1])
end
return created
