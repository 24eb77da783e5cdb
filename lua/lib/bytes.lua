-- The bytes a queue holds waiting, against its x-max-length-bytes (a library, included after
-- common and delay): docs/design.rst, "Queue arguments and limits".
-- KEYS: none of its own. The callers pass the queue's counters hash, big hash, streams,
-- delayed keys and staging hash, which they have in their KEYS with the queue's tag.
--@lazy
-- Field waiting-bytes of the queue's counters hash holds the sizes of its messages waiting to be
-- served: ready, requeued, delayed (retries waiting out x-requeue-delay too) and staged (fair
-- share); not those in flight, so an ack never touches it. A message's size is its envelope
-- as stored (field m), or a big message's body. Every script that moves a message into or
-- out of waiting changes the field in the same call, while it exists: a publish to a queue
-- with the argument creates it (as do a read and a redrive), limits.lua sets it to 0 when
-- the argument is set anew and drops it when the argument goes. A read that
-- leaves the queue with nothing waiting sets it to 0, as does a purge that emptied it, so a
-- count that was started on a queue already holding messages (or changed behind our back)
-- is right again from then on.

local WAITING_BYTES = 'waiting-bytes'

-- The bytes stream entry FIELDS (flat) counts for: its field m, or for a big message (field
-- r: its body's token) the body's length in the big hash BIG (an HSTRLEN; 0 without BIG).
local function entry_bytes(fields, big)
  if type(fields) ~= 'table' then return 0 end
  local m = field(fields, 'm')
  if m then return #m end
  local token = field(fields, 'r')
  if token and big then
    local n = redis.pcall('HSTRLEN', big, token)
    if type(n) == 'number' then return n end
  end
  return 0
end

-- The same for a delayed or staged VALUE (a TTL deadline prefix and "r:<token>" as
-- lua/lib/delay.lua's with_deadline and entry_of spell them).
local function value_bytes(value, big)
  if type(value) ~= 'string' then return 0 end
  return entry_bytes(entry_of(value), big)
end

-- The bytes of the waiting message STATE/A/B that replace mode replaces (lua/lib/unique.lua's
-- unique_drop: 'delayed' member A of the hash BODIES, 'staged' field A of the staging hash
-- FAIR, 'ready' entry B of stream A); BIG the big hash or nil. One HGET or XRANGE.
local function bytes_of_waiting(state, a, b, bodies, fair, big)
  if state == 'delayed' then return value_bytes(redis.call('HGET', bodies, a), big) end
  if state == 'staged' then return value_bytes(redis.call('HGET', fair, a), big) end
  local e = redis.call('XRANGE', a, b, b)[1]
  return e and entry_bytes(e[2], big) or 0
end

-- True when nothing waits in a queue: no level of STREAMS has a message to serve next (the
-- holder's first, then fresh: lua/lib/limits.lua's heads, GROUP and HOLDER), its delayed
-- set DKEY is empty, and its staging hash STAGING (or nil) holds none. O(levels), an entry
-- copied at most; asked only before a publish is refused for bytes.
local function bytes_none_waiting(streams, group, holder, dkey, staging)
  local s, unsure = heads(streams, group, holder)()
  if s or unsure then return false end
  if redis.pcall('ZCARD', dkey) ~= 0 then return false end
  return not (staging and redis.pcall('HEXISTS', staging, 'n') ~= 0)
end

-- True when COUNTERS keeps its queue's waiting bytes (the field exists; a key of another
-- type keeps nothing). One HEXISTS: what a script that may move messages pays first.
local function bytes_kept(counters)
  return counters ~= nil and redis.pcall('HEXISTS', counters, WAITING_BYTES) == 1
end

-- The waiting bytes COUNTERS holds (0 without the field), or (nil, error) when it holds
-- another type.
local function bytes_waiting(counters)
  local v, err = try('HGET', counters, WAITING_BYTES)
  if err then return nil, err end
  return math.max(tonumber(v) or 0, 0), nil
end

-- Add DELTA to the waiting bytes in COUNTERS (never below 0). A field just created gets the
-- expiry of the queue's first stream STREAM (x-expires), as count_in gives its counters. A
-- COUNTERS of another type is left alone.
local function bytes_add(counters, stream, delta)
  if delta == 0 then return end
  local r = redis.pcall('HINCRBY', counters, WAITING_BYTES, delta)
  if type(r) ~= 'number' then return end
  if r < 0 then redis.call('HSET', counters, WAITING_BYTES, 0) end
  if r == delta then expire_as(counters, stream) end
end

-- Nothing waits: the waiting bytes in COUNTERS are 0, if it keeps them (see bytes_kept).
local function bytes_reset(counters)
  if bytes_kept(counters) then redis.call('HSET', counters, WAITING_BYTES, 0) end
end
