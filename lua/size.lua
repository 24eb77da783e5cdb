--[[ size: count a queue's ready messages (published or requeued, not being worked on).

KEYS[1..n]  all streams of ONE queue (one per priority level)
ARGV[1]     consumer group (the queue's name)
ARGV[2]     name of the holder consumer that parks requeued messages
ARGV[3]     optional "1": the last key is the staging hash (x-fairness), its count ready too
Reply:      the number of ready messages
Errors:     "size: expected ..." for another layout; WRONGTYPE
Minimum Redis: 6.2. Cost: O(n + consumers); read-only. Ready = XLEN - PEL size + parked
with the holder, since acked entries are deleted at once. See docs/design.rst (Leases).
]]
--@include common
local staged = ARGV[3] == '1'
local bad = check_args('size', #KEYS >= (staged and 2 or 1), #ARGV == (staged and 3 or 2),
                       'KEYS: streams[, staging hash]; ARGV: group, holder[, "1"]')
if bad then return bad end
local group, holder, ready = ARGV[1], ARGV[2], 0
local streams = {unpack(KEYS, 1, #KEYS - (staged and 1 or 0))}
if staged then ready = tonumber(redis.call('HGET', KEYS[#KEYS], 'n')) or 0 end
for _, key in ipairs(streams) do
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
