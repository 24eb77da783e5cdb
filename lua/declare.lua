--[[ declare: create a queue: one stream per priority level, each with the queue's group.

KEYS[1..n]  all streams of ONE queue (one per priority level)
ARGV[1]     consumer group (the queue's name)
Reply:      number of streams created by this call (0 when the queue existed)
Minimum Redis: 6.2. Cost: O(n). Idempotent.

The group starts at id 0, so messages published before the first declare are delivered.
]]
local created = 0
for _, key in ipairs(KEYS) do
  local r = redis.pcall('XGROUP', 'CREATE', key, ARGV[1], '0', 'MKSTREAM')
  if type(r) == 'table' and r.err then
    local err = tostring(r.err)  -- tostring: fakeredis gives r.err as userdata
    if not string.find(err, 'BUSYGROUP', 1, true) then return redis.error_reply(err) end
  else
    created = created + 1
  end
end
return created
