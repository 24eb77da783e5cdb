--[[ route: one page of an exchange's routing table, bindings past their deadline dropped first.

KEYS[1]   the routing table (set), ks:x:{ex}:bindings
KEYS[2]   the table's deadlines (zset member -> unix ms), ks:x:{ex}:deadlines
KEYS[3]   fanout exchanges only: the exchange's stream, ks:x:{ex}:fanout
ARGV[1]   the most expired bindings to drop in this call (only on the first page)
ARGV[2]   SSCAN cursor of the table: "0" for the first page (expired bindings are dropped
          first), then the one the last call returned
ARGV[3]   SSCAN COUNT hint: about how many members one call looks at
ARGV[4]   with KEYS[3] only: the separator in binding members (the queue, which names the
          group, is what follows the last separator)
Reply:    {next cursor ("0": the table is read), member, ...}; as with SSCAN, a member may
          come in two pages (the caller keeps one), and one added or removed meanwhile may
          be missing
Errors:   "route: expected ..." for another layout; WRONGTYPE (checked before any write)
Minimum Redis: 6.2. Cost: one SSCAN step, about COUNT members (a table with fewer comes whole
in one step), plus O(dropped) on the first page and O(groups) to trim a fanout stream. An
expired fanout binding takes its group with it. See docs/design.rst (Fanout).
]]
--@include common
local bad = check_args('route', #KEYS == 2 or #KEYS == 3, #ARGV == #KEYS + 1,
                       'KEYS: table, deadlines[, fanout stream]; ' ..
                       'ARGV: count, cursor, page[, separator]')
if bad then return bad end
local fanout, sep = KEYS[3], ARGV[4]
-- every key is checked first (see wrong_type): no binding dropped with its group kept
local wrong = wrong_type(KEYS[1], 'set') or wrong_type(KEYS[2], 'zset')
if fanout then wrong = wrong or wrong_type(fanout, 'stream') end
if wrong then return redis.error_reply(wrong) end
if ARGV[2] == '0' then
  local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_ms(), 'LIMIT', 0,
                             tonumber(ARGV[1]))
  for _, member in ipairs(expired) do
    redis.call('SREM', KEYS[1], member)
    redis.call('ZREM', KEYS[2], member)
    if fanout and redis.call('EXISTS', fanout) == 1 then
      local queue, from = member, 1
      while true do
        local at = string.find(member, sep, from, true)
        if not at then break end
        queue = string.sub(member, at + #sep)
        from = at + 1
      end
      redis.pcall('XGROUP', 'DESTROY', fanout, queue)
    end
  end
  if fanout and #expired > 0 and redis.call('EXISTS', fanout) == 1 then trim_shared(fanout) end
end
local step = redis.call('SSCAN', KEYS[1], ARGV[2], 'COUNT', tonumber(ARGV[3]))
local reply = {step[1]}
for _, member in ipairs(step[2]) do reply[#reply + 1] = member end
return reply
