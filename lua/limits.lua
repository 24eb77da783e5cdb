--[[ limits: show or replace a queue's arguments (x-max-length...) at run time, as an operator's
policy would.

KEYS[1]   the queue's arguments (hash), ks:q:{celery}:args
KEYS[2]   the queue's first stream: while it exists, the queue does
KEYS[3]   the queue's counters (hash), ks:q:{celery}:counters: read; its waiting bytes
          (lua/lib/bytes.lua) start again at 0 when x-max-length-bytes is set anew, and go
          when it is removed; its in-flight bound (lua/lib/inflight.lua) goes at every "set"
          (reads did not keep it while the queue had no x-max-in-flight: the next read
          counts)
ARGV[1]   "get"; or "set" followed by field, value pairs (validated by the caller,
          kombu_streams/limits.py): they replace all the queue's arguments ("set" alone
          clears them)
Reply:    {arguments, counters}: the arguments recorded after the call and the queue's
          counters (expired...), each as a flat field, value list
Errors:   "limits: expected ..." for another layout; "limits: no queue ..." for "set" on a
          queue that does not exist; WRONGTYPE (checked before any write)
Minimum Redis: 6.2. Cost: O(arguments). See docs/design.rst (Queue arguments and limits).
]]
--@include common
local bad = check_args('limits', #KEYS == 3,
                       ARGV[1] == 'get' and #ARGV == 1 or ARGV[1] == 'set' and #ARGV % 2 == 1,
                       'KEYS: arguments hash, first stream, counters; ARGV: "get", or ' ..
                       '"set" and pairs')
if bad then return bad end
local argkey, first = KEYS[1], KEYS[2]
local wrong = wrong_type(argkey, 'hash') or wrong_type(first, 'stream')
  or wrong_type(KEYS[3], 'hash')
if wrong then return redis.error_reply(wrong) end
if ARGV[1] == 'set' then
  if redis.call('EXISTS', first) == 0 then
    return redis.error_reply('limits: no queue at ' .. first .. ' (declare it first)')
  end
  redis.call('HDEL', KEYS[3], 'in-flight-bound')
  local kept = redis.call('HEXISTS', argkey, 'x-max-length-bytes') == 1
  redis.call('DEL', argkey)
  local keeps = false
  for i = 2, #ARGV, 2 do keeps = keeps or ARGV[i] == 'x-max-length-bytes' end
  if not keeps then
    redis.call('HDEL', KEYS[3], 'waiting-bytes')
  elseif not kept then  -- counted from now on (what waits already is left out)
    redis.call('HSET', KEYS[3], 'waiting-bytes', 0)
    expire_as(KEYS[3], first)
  end
  if #ARGV > 1 then
    redis.call('HSET', argkey, unpack(ARGV, 2))
    expire_as(argkey, first)
  end
end
return {redis.call('HGETALL', argkey), redis.call('HGETALL', KEYS[3])}
