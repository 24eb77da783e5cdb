--[[ declare: create a queue: one stream per priority level, each with the queue's group.

KEYS[1..n]  all streams of ONE queue (one per priority level)
ARGV[1]     consumer group (the queue's name)
Reply:      number of streams that got the group in this call (0 when the queue existed)
Errors:     "declare: expected ..." for another layout; WRONGTYPE (checked before any write)
Minimum Redis: 6.2. Cost: O(n). Idempotent; the group starts at id 0, so messages published
before the first declare are delivered. See docs/design.rst (Key layout).
]]
--@include common
local bad = check_args('declare', #KEYS >= 1, #ARGV == 1, 'KEYS: streams; ARGV: group')
if bad then return bad end

-- True when KEY is a stream that has GROUP already: then nothing is written, so a consumer
-- can declare its queue (and drain it) while Redis is at maxmemory.
local function has_group(key, group)
  if redis.call('TYPE', key)['ok'] ~= 'stream' then return false end
  local _, info = last_delivered(key, group)
  return info ~= nil
end

-- every key is checked first (see wrong_type): no queue with some of its levels only
local wrong = wrong_streams(1, #KEYS)
if wrong then return redis.error_reply(wrong) end
local created = 0
for _, key in ipairs(KEYS) do
  if not has_group(key, ARGV[1]) then
    local err = pcall_error(redis.pcall('XGROUP', 'CREATE', key, ARGV[1], '0', 'MKSTREAM'))
    if err == nil then
      created = created + 1
    elseif not string.find(err, 'BUSYGROUP', 1, true) then
      return redis.error_reply(err)
    end
  end
end
return created
