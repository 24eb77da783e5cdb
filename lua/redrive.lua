--[[ redrive: move dead letters back to their queue, oldest first.

KEYS[1]     the queue's dead-letter stream, ks:q:{name}:dlq
KEYS[2..n]  all streams of the queue (one per priority level)
KEYS[n+1]   the queue's wake marker (zset)
KEYS[n+2]   the queue's ready index (set)
ARGV[1]     the most dead letters to move in this call
ARGV[2..]   optional: only these dead-letter ids, in this order (otherwise the oldest
            ones); an id given twice counts once, an id not in the stream is ignored
Reply:      {moved, skipped}: skipped counts dead letters that hold no message (an entry
            that was never a Kombu message) or came from a stream of another queue; they
            stay in the dead-letter stream
Errors:     "redrive: expected ..." for another layout; WRONGTYPE (checked before any write)
Minimum Redis: 6.2. Cost: O(count), or O(number of ids given). A letter goes back to the
stream it came from as a new entry (a fresh delivery count); a big message's (f:r) as its
token, its body left in the queue's big hash. See docs/design.rst
(Delivery counts and dead letters).
]]
--@include common
local bad = check_args('redrive', #KEYS >= 4, #ARGV >= 1,
                       'KEYS: dlq, streams, marker, index; ARGV: count[, ids]')
if bad then return bad end
local n = #KEYS - 2
local limit = tonumber(ARGV[1])
-- every key is checked first (see wrong_type): no letter moved without its marker
local wrong = wrong_type(KEYS[1], 'stream') or wrong_type(KEYS[n + 1], 'zset')
  or wrong_type(KEYS[n + 2], 'set')
wrong = wrong or wrong_streams(2, n)
if wrong then return redis.error_reply(wrong) end
if limit <= 0 then return {0, 0} end  -- XRANGE COUNT 0 answers nil on Redis
local entries
if #ARGV > 1 then
  entries = {}
  local wanted = {}
  for j = 2, #ARGV do
    local found = redis.call('XRANGE', KEYS[1], ARGV[j], ARGV[j])
    -- an id given twice is moved once (XRANGE normalizes it, e.g. "5" and "5-0")
    if found[1] and not wanted[found[1][1]] then
      wanted[found[1][1]] = true
      entries[#entries + 1] = found[1]
    end
  end
else
  entries = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', limit)
end
local moved, skipped = 0, 0
local added, members = {}, {}  -- ready index members of the streams that got letters
for _, e in ipairs(entries) do
  if moved >= limit then break end
  -- a big message's letter holds its token (f:r): it goes back as such, its body stays put
  local name, payload = 'm', field(e[2], 'f:m')
  if payload == nil then name, payload = 'r', field(e[2], 'f:r') end
  local origin = field(e[2], 'stream')
  local target = nil
  for i = 2, n do
    if KEYS[i] == origin then target = KEYS[i] end
  end
  if payload and target then
    redis.call('XADD', target, '*', name, payload)
    redis.call('XDEL', KEYS[1], e[1])
    if not added[target] then
      added[target] = true
      members[#members + 1] = target
    end
    moved = moved + 1
  else
    skipped = skipped + 1
  end
end
if moved > 0 then
  index_add(KEYS[n + 2], KEYS[2], unpack(members))
  arm(KEYS[n + 1], KEYS[2])
end
return {moved, skipped}
