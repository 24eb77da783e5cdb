--[[ peek: the next COUNT ready messages of ONE queue, in serving order, changing nothing.

KEYS[1..n]  all streams of ONE queue (one per priority level), in priority order
KEYS[n+1]   the queue's staging hash (x-fairness), ks:q:{celery}:fair: its staged messages
            are shown after their level's stream entries (none when it does not exist)
ARGV[1]     consumer group (the queue's name)
ARGV[2]     name of the holder consumer that parks requeued messages
ARGV[3]     COUNT: the most messages to return, 1..1000
ARGV[4]     where this page starts: stream index i (1..n; 1 for the first page)
ARGV[5]     and the part of stream i: 'h' its held entries (then its fresh ones, then its
            staged ones), 'f' its fresh ones (then staged), 's' its staged ones
ARGV[6]     and where in that part: the last id the page before returned ("" for none); for
            's' how many staged messages of the level the pages before went through
Reply:      {i, part, after, then per message: stream index, entry id, held, payload}
              i, part, after  where the next page starts (ARGV[4..6] of the next call); i
                           is 0 when every ready message was returned (a page short of
                           COUNT may still give one: held entries deleted while parked, or
                           messages past their TTL, which are not shown)
              entry id     "" for a staged message (it has none until a read moves it)
              held         1 if parked with the holder (requeued or reclaimed), 2 if staged
                           (x-fairness), else 0
              payload      the entry's "m" field; {token} for a big message (field r: its
                           body is in the queue's big hash); "" when it has neither (a
                           read sets such an entry aside)
Order:      as read.lua serves (levels in priority order; held entries, then fresh ones, then
            staged ones in the order the groups' rotation will move them, lua/lib/fair.lua,
            the first 1,000 of a level at most); due delayed messages not moved yet are not
            shown, nor messages past their TTL deadline (field e): the next read sets those
            aside, never delivers them
Errors:     "peek: expected ..." for another layout; WRONGTYPE (a staging hash of another
            type: no staged message shown)
Minimum Redis: 6.2. Cost: O(n + COUNT) commands (a TIME when an entry has a deadline; for
staged messages a few hash reads per group passed and one HMGET; a page that starts at the
k-th staged message of a level plans the rotation from its start: O(k + COUNT) hash reads,
k < 1,000); read-only (EVALSHA_RO on 7.0+). Why: operators see what the next reads would
deliver. See docs/design.rst (The ready index, Fair share).
]]
--@flags no-writes
--@include common
--@include delay
--@include expiry
--@include fair
local n, want, start = #KEYS - 1, tonumber(ARGV[3]), tonumber(ARGV[4])
local bad = check_args('peek', n >= 1, #ARGV == 6 and want ~= nil and want >= 1 and
                       want <= 1000 and start ~= nil and start >= 1 and start <= n and
                       (ARGV[5] == 'h' or ARGV[5] == 'f' or
                        (ARGV[5] == 's' and tonumber(ARGV[6]) ~= nil)),
                       'KEYS: streams, staging hash; ARGV: group, holder, COUNT 1..1000, ' ..
                       'stream index, h, f or s, id (s: a count)')
if bad then return bad end
local group, holder, fair = ARGV[1], ARGV[2], KEYS[#KEYS]
local reply, left = {0, '', ''}, want
local now = nil  -- the server's clock, read at the first deadline met
local STAGED_MAX = 1000  -- staged messages shown per level at most (in rotation order)

local function add(i, entry, held)
  local deadline = deadline_of(entry[2])
  if deadline then
    now = now or now_ms()
    if deadline <= now then return end  -- expired: a read sets it aside (Message TTL)
  end
  local k = #reply
  reply[k + 1], reply[k + 2], reply[k + 3] = i, entry[1], held
  local payload = field(entry[2], 'm')
  if payload == nil and field(entry[2], 'r') then payload = {field(entry[2], 'r')} end
  reply[k + 4] = payload or ''
  left = left - 1
end

-- The next page starts in part PART of stream I, after AFTER (an id; for 's' a count).
local function stop(i, part, after)
  reply[1], reply[2], reply[3] = i, part, after
  return reply
end

-- Stream I's staged messages (x-fairness) in the order reads will move them, from the
-- SKIP-th: a page (returned), or nil when the level has no more to show.
local function staged(i, skip)
  local level = lib_fair().fair_level(KEYS[i])
  local tail, err = try('HGET', fair, 'c:' .. level)  -- another type: nothing staged here
  if err or not tail or skip >= STAGED_MAX then return nil end
  local cap = math.min(skip + left, STAGED_MAX)
  local plan = lib_fair().fair_plan(fair, level, cap, tail, {x = {}, h = {}, t = {}})
  if #plan.order > skip then
    local values = redis.call('HMGET', fair, unpack(plan.order, skip + 1))
    for _, value in ipairs(values) do
      if value then add(i, {'', entry_of(value)}, 2) end
    end
  end
  if #plan.order >= cap and not plan.done and cap < STAGED_MAX then
    return stop(i, 's', tostring(cap))
  end
  return nil
end

for i = start, n do
  local key, part, after = KEYS[i], 'h', ''
  if i == start then part, after = ARGV[5], ARGV[6] end
  if redis.call('EXISTS', key) == 1 then
    local last, info = last_delivered(key, group)  -- no group yet: '0-0', every entry fresh
    if part == 'h' and info then
      local from = '-'
      if after ~= '' then from = '(' .. after end
      local asked = left
      local held = redis.call('XPENDING', key, group, from, '+', asked, holder)
      for _, p in ipairs(held) do
        local entry = redis.call('XRANGE', key, p[1], p[1])[1]
        if entry then add(i, entry, 1) end  -- one deleted while parked is never served
      end
      if #held >= asked then return stop(i, 'h', held[#held][1]) end
    end
    if part ~= 's' then
      if part == 'f' and after ~= '' then last = after end  -- the page before ended there
      local asked = left
      local fresh = redis.call('XRANGE', key, '(' .. last, '+', 'COUNT', asked)
      for _, entry in ipairs(fresh) do add(i, entry, 0) end
      -- a whole page (some maybe expired, not shown): the stream may hold more, next page
      if #fresh >= asked then return stop(i, 'f', fresh[#fresh][1]) end
      after = '0'
    end
    local page = staged(i, tonumber(after) or 0)
    if page then return page end
  end
end
return reply
