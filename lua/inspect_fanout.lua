--[[ inspect_fanout: a read-only snapshot of ONE fanout exchange's stream and its groups, a
page of groups per call.

KEYS[1]   the exchange's fanout stream, ks:x:{ex}:fanout
ARGV[1]   cap: the most unread entries counted per group (bounds the work; see lag)
ARGV[2]   from: how many groups earlier calls of this snapshot reported (0 in the first call)
ARGV[3]   budget: the most entries this call reads (each group reads up to cap + 1); it
          reports at least one group, then stops before a group that could pass the budget
Reply:    {exists, length, now, groups, next}: exists 1 if the stream exists, else 0; length
          its XLEN; now the server's clock in unix ms (TIME); groups one record per group (one
          per bound queue) from group number from + 1 on, in XINFO GROUPS order:
          {name, consumers, pending, lag, capped, oldest, last}
            consumers  number of consumers of the group
            pending    delivered to the group's consumers and not acked yet
            lag        entries after the group's last-delivered id (not read yet): exact up
                       to cap; beyond it XINFO GROUPS "lag" where the server knows it (7.0+)
            capped     1 when there are more than cap such entries and the server cannot
                       tell how many (then lag is cap), else 0
            oldest     age in ms of the oldest unread entry (from its id), -1 when none
            last       the group's last-delivered id
          next: ARGV[2] of the next call, 0 when this call reported the last group. Pages are
          not one snapshot: a group created or destroyed between two calls may shift the rest
          by one (an operator's view).
Errors:   "inspect_fanout: expected ..." for another layout; WRONGTYPE
Minimum Redis: 6.2 (exclusive XRANGE). Cost: XINFO GROUPS, O(groups) records without entries
(Redis cannot page it), plus at most max(budget, cap + 1) entries read. Read-only (no-writes,
as inspect.lua). See docs/design.rst (Fanout).
]]
--@flags no-writes
--@include common
local bad = check_args('inspect_fanout', #KEYS == 1, #ARGV == 3,
                       'KEYS: stream; ARGV: cap, from, budget')
if bad then return bad end
local key, cap = KEYS[1], tonumber(ARGV[1])
local from, budget = tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
if redis.call('EXISTS', key) == 0 then return {0, 0, now, {}, 0} end
local length = redis.call('XLEN', key)
local all = redis.call('XINFO', 'GROUPS', key)
local groups, spent, i = {}, 0, from + 1
while all[i] and (#groups == 0 or spent + cap + 1 <= budget) do
  local g = all[i]
  local last = field(g, 'last-delivered-id')
  local unread = redis.call('XRANGE', key, '(' .. last, '+', 'COUNT', cap + 1)
  spent = spent + cap + 1
  local lag, capped = #unread, 0
  if lag > cap then
    local known = field(g, 'lag')  -- Redis 7.0+: a number, or nil (false) when unknown
    if type(known) == 'number' and known >= cap then
      lag = known
    else
      lag, capped = cap, 1
    end
  end
  local oldest = -1
  if unread[1] then
    local ms = tonumber(string.match(unread[1][1], '^(%d+)'))
    oldest = math.max(now - ms, 0)
  end
  groups[#groups + 1] = {field(g, 'name'), tonumber(field(g, 'consumers')),
                         tonumber(field(g, 'pending')), lag, capped, oldest, last}
  i = i + 1
end
local after = 0
if all[i] then after = i - 1 end
return {1, length, now, groups, after}
