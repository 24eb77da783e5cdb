-- Priority aging (a library, included after common and before serve): x-priority-aging = P ms
-- serves a queue's ready message as if one level higher for each P it has waited, so under a
-- steady stream of higher-priority work a lower level's first message waits about (levels
-- between) x P, not forever. Strict priority without the argument (src.aging false: nothing
-- here runs). Why it is correct and bounded, and what counts as a message's wait:
-- docs/design.rst, "Priority aging". KEYS: none of its own; read.lua passes the streams.
--
-- A level's wait is that of its first message in line, as serve_held and serve_fresh would
-- take them: the oldest held entry (parked with the holder: requeued, reclaimed, a retry
-- that became due) has waited its idle time in the holder's PEL, which parking reset; else
-- the first entry after the group's last-delivered id has waited since its id (the XADD time
-- of a publish, of a due delayed message's move, of a redrive).
--
--@lazy: built only when a call needs it; callers write lib_aging().helper(...)
-- (kombu_streams/flatten.py).

local PRIORITY_AGING = 'x-priority-aging'

-- The aging state of a queue whose stored x-priority-aging is VALUE (false or nil: none, as
-- the HMGET of its arguments gives it): false without, else {period, waits, done, busy};
-- or (nil, error) when VALUE is not an integer >= 1 (ms).
local function aging_open(value)
  if not value then return false, nil end
  local n = tonumber(value)
  if not n or n < 1 or n ~= math.floor(n) then
    return nil, 'invalid ' .. PRIORITY_AGING .. ' ' .. tostring(value) ..
                ' (kombu-streams limits sets valid ones)'
  end
  return {period = n, waits = nil, done = {}, busy = false}, nil
end

-- The ms the first message in line of stream KEY (GROUP's, parked with HOLDER when HELD may
-- be set) has waited at server time NOW, when it is at least PERIOD (less can age no level
-- in this call), else nil. One XPENDING when held entries may be there; else, or when none
-- is, XINFO GROUPS and an XRANGE that copies the entry only when it waited PERIOD or more.
-- A key that cannot be read counts as nothing aged: its own turn reports the problem.
local function aging_wait(key, group, holder, held, now, period)
  if held then
    local p = try('XPENDING', key, group, '-', '+', 1, holder)
    if p and p[1] then
      local idle = tonumber(p[1][3]) or 0
      if idle >= period then return idle end
      return nil
    end
  end
  local groups = try('XINFO', 'GROUPS', key)
  if not groups then return nil end  -- no stream (or another type): nothing waits there
  local last = '0-0'  -- no group yet: the read makes it at id 0, so all of it is fresh
  for _, g in ipairs(groups) do
    if field(g, 'name') == group then last = field(g, 'last-delivered-id') end
  end
  local e = try('XRANGE', key, '(' .. last, string.format('%.0f', now - period),
                  'COUNT', 1)
  local id = e and e[1] and e[1][1]
  if not id then return nil end
  return now - tonumber(string.match(id, '^(%d+)'))
end

-- Before stream I of queue source SRC is served: serve first, one message each, the levels
-- whose first message in line counts as I's level or higher, as ordered below. A level L
-- whose first message waited W counts as level L - floor(W / period) (level: position in
-- SRC's streams); those that count higher go first, and a tie goes to the level that
-- climbed more (waited more periods), so an aged level goes before the real one it ties.
-- The waits are looked at once per call, at the first stream of SRC with work, for every
-- lower level the ready index names (every level on a walk); that first level is not
-- looked at (it counts as itself). A level is served so at most once per call: its next
-- message has its own wait, looked at by the next call. Stream I itself, when looked at
-- and aged, is one of those levels: its first message goes at its place, the rest after.
-- SERVE is serve.lua's serve_stream, run with COUNT cut to one; NOW the call's clock.
local function aging_serve(ctx, src, i, now, serve)
  local ag, streams, idx = src.aging, src.streams, src.index
  if ag.busy then return end
  local pos = 0
  for p, j in ipairs(streams) do
    if j == i then pos = p end
  end
  if not ag.waits then
    ag.waits = {}
    for p = pos + 1, #streams do
      local key = KEYS[streams[p]]
      if src.walk or idx[key] or idx[HELD .. key] then
        ag.waits[p] = aging_wait(key, src.group, ctx.holder, src.walk or idx[HELD .. key], now,
                                 ag.period) or false
      end
    end
  end
  local aged = {}
  for p = pos, #streams do
    local wait = ag.waits[p]
    if wait and not ag.done[p] then
      local up = math.floor(wait / ag.period)
      if up >= math.max(p - pos, 1) then aged[#aged + 1] = {p - up, p} end
    end
  end
  table.sort(aged, function(a, b) return a[1] < b[1] or (a[1] == b[1] and a[2] > b[2]) end)
  for _, a in ipairs(aged) do
    if ctx.left <= 0 or src.failed then return end
    local p, left, before = a[2], ctx.left, #ctx.out
    ag.done[p], ag.busy, ctx.left = true, true, 1
    serve(ctx, src, streams[p])
    ag.busy = false
    ctx.left = ctx.halted and 0 or left - (#ctx.out - before) / 4
  end
end
