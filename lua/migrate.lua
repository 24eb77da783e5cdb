--[[ migrate: move the oldest messages of one of Kombu's Redis-transport lists into a queue.

KEYS[1]       the Kombu list: the queue's name, or name + sep + step for a priority step,
              with Kombu's global_keyprefix (e.g. celery, or "celery\x06\x163")
KEYS[2..n+1]  all streams of the target queue, one per priority level, e.g. ks:q:{celery}:0
KEYS[n+2]     the target queue's wake marker (zset), ks:q:{celery}:wake
KEYS[n+3]     the target queue's ready index (set), ks:q:{celery}:ready
ARGV[1]       the most entries to look at in this call
ARGV[2]       todo: entries at the list's oldest end this run has not looked at yet (the
              cursor, from the previous reply); -1 in a run's first call: all of them
ARGV[3]       i: the stream (1..n) for messages whose priority cannot be read: the level of
              the list's own priority step
ARGV[4..n+3]  the priority level of each stream in KEYS[2..n+1], ascending (e.g. 0 3 6 9)
Reply:        {moved, kept, left, todo, kept entry, ...}: messages moved; malformed entries
              met in this call (kept in the list); the list's length afterwards; ARGV[2] of
              the next call (0: the run has looked at every entry there was when it began);
              then the malformed entries themselves, for the report
Errors:       "migrate: expected ..." for another layout; WRONGTYPE (checked before any write)
Minimum Redis: 6.2. Cost: O(count) list operations (the oldest count entries read and
trimmed, the malformed ones among them pushed back), plus decoding each entry looked at.
Oldest (rightmost) first, each message as stored to the level of its properties.priority
(clamped to 0..9, as Kombu does). An entry that is not a Kombu message stays in the list: it
goes to the list's newest end (LPUSH), where the rest of the run does not meet it again, so a
call never re-reads what earlier calls kept. Once a run has looked at every entry the kept
ones are the list, in their order; a run stopped half-way leaves those it met ahead of the
rest (newest end), and entries pushed while it runs sit beyond them, for the next run. The
target queue must be declared first. See docs/design.rst (Wake-ups, The ready index).
]]
--@include common
local bad = check_args('migrate', #KEYS >= 4, #ARGV == #KEYS,
                       'KEYS: list, n streams, marker, index; ARGV: count, todo, i, n levels')
if bad then return bad end
local n = #KEYS - 3
local limit, todo, fallback = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local levels = {}
for i = 1, n do levels[i] = tonumber(ARGV[3 + i]) end

-- Kombu's priority of a decoded envelope (int(properties.priority) clamped to 0..9), or nil
-- when Kombu would not read one (missing, null, not a whole number).
local function priority(msg)
  local props = msg['properties']
  if type(props) ~= 'table' then return nil end
  local p = props['priority']
  if type(p) == 'boolean' then
    p = p and 1 or 0
  elseif type(p) == 'string' then
    p = tonumber(string.match(p, '^%s*([-+]?%d+)%s*$'))
  elseif type(p) ~= 'number' then
    return nil
  end
  if p == nil or p ~= p or p == math.huge or p == -math.huge then return nil end
  if p >= 0 then p = math.floor(p) else p = math.ceil(p) end  -- int() truncates toward 0
  return math.max(0, math.min(9, p))
end

-- The stream (1..n) for a raw list entry, or nil when it is not a Kombu message (Kombu's
-- consumers, and ours, need a JSON object with "body" and a "properties" object).
local function target(raw)
  local ok, msg = pcall(cjson.decode, raw)
  if not ok or type(msg) ~= 'table' or msg['body'] == nil
      or type(msg['properties']) ~= 'table' then
    return nil
  end
  local p = priority(msg)
  if p == nil then return fallback end
  local index = 1
  for i = 1, n do
    if levels[i] <= p then index = i end
  end
  return index
end

-- every key is checked before the first write (see wrong_type)
local wrong = wrong_type(KEYS[1], 'list') or wrong_type(KEYS[n + 2], 'zset')
  or wrong_type(KEYS[n + 3], 'set')
wrong = wrong or wrong_streams(2, n + 1)
if wrong then return redis.error_reply(wrong) end

local length = redis.call('LLEN', KEYS[1])
if todo < 0 or todo > length then todo = length end
local size = math.min(math.max(limit, 0), todo)
if size == 0 then return {0, 0, length, todo} end
-- the window: the SIZE oldest entries, none looked at by this run yet (rightmost first)
local window = redis.call('LRANGE', KEYS[1], -size, -1)
local kept, moved = {}, 0
local added, members = {}, {}  -- ready index members of the streams that got messages
for j = #window, 1, -1 do
  local raw = window[j]
  local index = target(raw)
  if index then
    redis.call('XADD', KEYS[1 + index], '*', 'm', raw)
    if not added[index] then
      added[index] = true
      members[#members + 1] = KEYS[1 + index]
    end
    moved = moved + 1
  else
    kept[#kept + 1] = raw
  end
end
-- Take the window off; the malformed entries go to the newest end, oldest first, so they
-- keep their order among themselves and the rest of the run does not meet them again.
redis.call('LTRIM', KEYS[1], 0, -(size + 1))
for _, raw in ipairs(kept) do redis.call('LPUSH', KEYS[1], raw) end
if moved > 0 then
  index_add(KEYS[n + 3], KEYS[2], unpack(members))
  arm(KEYS[n + 2], KEYS[2])
end
local reply = {moved, #kept, redis.call('LLEN', KEYS[1]), todo - size}
for _, raw in ipairs(kept) do reply[#reply + 1] = raw end
return reply
