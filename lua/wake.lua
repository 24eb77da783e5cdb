--[[ wake: give wake markers back, one call for many sources, each only if it still exists.

KEYS[3s-2]  wake marker (zset) of source s, s = 1..N: ks:q:{queue}:wake for a queue's own
            streams, ks:x:{ex}:wake:<queue> for its group on a fanout stream
KEYS[3s-1]  what tells whether source s exists: the queue's first stream, ks:q:{queue}:0;
            for a fanout source the exchange's stream, ks:x:{ex}:fanout (with the group)
KEYS[3s]    fanout source: the exchange's binding deadlines, ks:x:{ex}:deadlines; a queue:
            its marker again
ARGV[3s-2]  'q': a queue's own streams; 'f': a queue's group on a fanout stream
ARGV[3s-1]  the queue (the group's name on the fanout stream)
ARGV[3s]    'f': the queue's binding member in the deadlines ('' when unknown); 'q': ''
Reply:      one character per source: '1' its marker is set, '0' the source is gone (the
            queue's first stream, or the group or binding, no longer exists): nothing written
Errors:     "wake: expected ..." for another layout or more than 500 sources; WRONGTYPE (every
            key checked before any write)
Minimum Redis: 6.2. Cost: O(N), N at most 500: a few O(1) commands per source. The caller
chunks. Keys of several queues (hash slots) in one call are fine on one Redis, as in
read.lua; on Redis Cluster the caller sends one call per slot (Broker.give_back_calls).
A queue's marker gets the first stream's expiry when that stream expires (x-expires); a
fanout source's marker expires at its binding's deadline, as fanout_publish.lua sets it, and
a binding past its deadline counts as gone. See docs/design.rst (Wake-ups).
]]
--@include common
local MAX = 500
local n = #KEYS / 3
local bad = check_args('wake', #KEYS >= 3 and #KEYS % 3 == 0 and n <= MAX, #ARGV == #KEYS,
                       'KEYS: marker, stream, deadlines (or the marker) per source, at most ' ..
                       MAX .. ' sources; ARGV: kind, queue, binding member per source')
if bad then return bad end
-- every key is checked first (see wrong_type): no marker set before an error
for s = 1, n do
  local kind = ARGV[3 * s - 2]
  if kind ~= 'q' and kind ~= 'f' then
    return redis.error_reply('wake: expected kind q or f of source ' .. s .. '; got ' .. kind)
  end
  local wrong = wrong_type(KEYS[3 * s - 2], 'zset') or wrong_type(KEYS[3 * s - 1], 'stream')
    or wrong_type(KEYS[3 * s], 'zset')
  if wrong then return redis.error_reply(wrong) end
end

local now = nil
local status = {}
for s = 1, n do
  local wake, stream, kind = KEYS[3 * s - 2], KEYS[3 * s - 1], ARGV[3 * s - 2]
  local set = false
  if kind == 'q' then
    if redis.call('EXISTS', stream) == 1 then
      redis.call('ZADD', wake, 0, 'w')
      expire_as(wake, stream)
      set = true
    end
  elseif try('XPENDING', stream, ARGV[3 * s - 1], '-', '+', 1) then  -- the group exists
    local deadline = ARGV[3 * s] ~= '' and redis.call('ZSCORE', KEYS[3 * s], ARGV[3 * s])
    if deadline then
      deadline = math.floor(tonumber(deadline))
      if now == nil then now = now_ms() end
    end
    if not deadline or deadline > now then
      redis.call('ZADD', wake, 0, 'w')
      if deadline then redis.call('PEXPIREAT', wake, deadline) end
      set = true
    end
  end
  status[s] = set and '1' or '0'
end
return table.concat(status)
