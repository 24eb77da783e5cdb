--[[ declare: create a queue: one stream per priority level, each with the queue's group.

KEYS[1..n]  all streams of ONE queue (one per priority level)
ARGV[1]     consumer group (the queue's name)
Reply:      number of streams created by this call (0 when the queue existed)
Minimum Redis: 6.2. Cost: O(n). Idempotent.

The group starts at id 0, so messages published before the first declare are delivered.
]]
-- True when KEY is a stream that already has GROUP: then nothing is written, so declaring
-- an existing queue works even when Redis is at maxmemory (a consumer must be able to start
-- and drain the queue that would free memory).
local function has_group(key, group)
  if redis.call('TYPE', key)['ok'] ~= 'stream' then return false end
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do
    for i = 1, #g, 2 do
      if g[i] == 'name' and g[i + 1] == group then return true end
    end
  end
  return false
end

local created = 0
for _, key in ipairs(KEYS) do
  local r = 0
  if not has_group(key, ARGV[1]) then
    r = redis.pcall('XGROUP', 'CREATE', key, ARGV[1], '0', 'MKSTREAM')
  end
  if type(r) == 'table' and r.err then
    local err = tostring(r.err)  -- tostring: fakeredis gives r.err as userdata
    if not string.find(err, 'BUSYGROUP', 1, true) then return redis.error_reply(err) end
  elseif r ~= 0 then
    created = created + 1
  end
end
return created
