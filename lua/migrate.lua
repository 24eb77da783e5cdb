--[[ migrate: move the oldest messages of one of Kombu's Redis-transport lists into a queue.

KEYS[1]       the Kombu list: the queue's name, or name + sep + step for a priority step,
              with Kombu's global_keyprefix (e.g. celery, or "celery\x06\x163")
KEYS[2..n+1]  all streams of the target queue, one per priority level, e.g. ks:q:{celery}:0
KEYS[n+2]     the target queue's wake marker (zset), ks:q:{celery}:wake
KEYS[n+3]     the target queue's ready index (set), ks:q:{celery}:ready
ARGV[1]       the most messages to move in this call
ARGV[2]       S: entries at the list's oldest end already known to be malformed; they are
              passed over and stay where they are
ARGV[3]       i: the stream (1..n) for messages whose priority cannot be read: the level of
              the list's own priority step
ARGV[4..n+3]  the priority level of each stream in KEYS[2..n+1], ascending (e.g. 0 3 6 9)
Reply:        {moved, kept, left, kept entry, ...}: messages moved; malformed entries met in
              this call (left in the list, at its oldest end, in their order); the list's
              length afterwards; then the malformed entries themselves, for the report
Errors:       "migrate: expected ..." for another layout; WRONGTYPE (checked before any write)
Minimum Redis: 6.2. Cost: O(S + count) list operations, plus decoding each moved message.
Oldest (rightmost) first, each message as stored to the level of its properties.priority
(clamped to 0..9, as Kombu does); an entry that is not a Kombu message stays in the list.
The target queue must be declared first. See docs/design.rst (Wake-ups, The ready index).
]]
--@include common
local bad = check_args('migrate', #KEYS >= 4, #ARGV == #KEYS,
                       'KEYS: list, n streams, marker, index; ARGV: count, S, i, n levels')
if bad then return bad end
local n = #KEYS - 3
local limit, skip, fallback = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
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

if limit <= 0 then return {0, 0, redis.call('LLEN', KEYS[1])} end
-- the window: the S passed-over entries and up to LIMIT more, oldest (rightmost) first
local window = redis.call('LRANGE', KEYS[1], -(skip + limit), -1)
local back, kept, moved = {}, {}, 0
local added, members = {}, {}  -- ready index members of the streams that got messages
for j = #window, 1, -1 do
  local raw, i = window[j], #window - j + 1
  local index = nil
  if i > skip then index = target(raw) end
  if index then
    redis.call('XADD', KEYS[1 + index], '*', 'm', raw)
    if not added[index] then
      added[index] = true
      members[#members + 1] = KEYS[1 + index]
    end
    moved = moved + 1
  else
    back[#back + 1] = raw
    if i > skip then kept[#kept + 1] = raw end
  end
end
if moved > 0 then
  -- Take the window off and put the passed-over entries back at the oldest end in their
  -- order (the oldest goes last).
  redis.call('LTRIM', KEYS[1], 0, -(#window + 1))
  for i = #back, 1, -1 do redis.call('RPUSH', KEYS[1], back[i]) end
  index_add(KEYS[n + 3], KEYS[2], unpack(members))
  arm(KEYS[n + 2], KEYS[2])
end
local reply = {moved, #kept, redis.call('LLEN', KEYS[1])}
for _, raw in ipairs(kept) do reply[#reply + 1] = raw end
return reply
