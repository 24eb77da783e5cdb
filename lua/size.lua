--[[ size: count a queue's ready messages (published or requeued, not being worked on).

KEYS[1..n]  all streams of ONE queue (one per priority level)
ARGV[1]     consumer group (the queue's name)
ARGV[2]     name of the holder consumer that parks requeued messages
Reply:      the number of ready messages
Minimum Redis: 6.2. Cost: O(n + consumers); read-only.

ready = entries in the stream - entries in the PEL + entries parked with the holder, which
holds because acked entries are deleted at once.
]]
--@include common
local group, holder, ready = ARGV[1], ARGV[2], 0
for _, key in ipairs(KEYS) do
  local len = redis.call('XLEN', key)
  if len > 0 then
    local summary = try('XPENDING', key, group)
    ready = ready + len
    if summary then
      ready = ready - tonumber(summary[1])
      if type(summary[4]) == 'table' then
        for _, c in ipairs(summary[4]) do
          if c[1] == holder then ready = ready + tonumber(c[2]) end
        end
      end
    end
  end
end
return ready
