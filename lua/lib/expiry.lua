-- Message TTL (a library, included after common): the deadline a publish stamps on a message
-- and how it is carried and read back. Why a stamp rather than the entry id, and what keeps
-- it: docs/design.rst, "Message TTL".
-- KEYS: none of its own; callers pass the keys (streams, delayed messages, counters hash).

local EXPIRES = 'e'      -- stream entry field: the deadline, unix ms; absent: never expires
local EXPIRED = 'expired'  -- dead-letter reason, and the field of the queue's counters hash

-- The deadline (unix ms) of a message published at server time SEC, USEC (TIME) under queue
-- TTL QUEUE_TTL and per-message EXPIRATION (ms, either may be nil): the lower applies, as in
-- RabbitMQ. Rounded up to the ms, so never early. nil when neither is given.
local function deadline_at(sec, usec, queue_ttl, expiration)
  local ttl = queue_ttl
  if expiration and (ttl == nil or expiration < ttl) then ttl = expiration end
  if ttl == nil then return nil end
  return string.format('%d', sec * 1000 + math.ceil(usec / 1000) + math.max(ttl, 0))
end

-- The deadline of stream entry FIELDS (flat), or nil. An entry without one has a single field
-- (m or r), so a message without TTL costs one length test here.
local function deadline_of(fields)
  if type(fields) ~= 'table' or #fields < 4 then return nil end
  return tonumber(field(fields, EXPIRES))
end

-- Add N to counter NAME of a queue's counters hash STATS, created with the expiry of STREAM
-- (x-expires) when new; a STATS of another type is left alone (returns its error).
local function count_in(stats, stream, name, n)
  local r = redis.pcall('HINCRBY', stats, name, n)
  local err = pcall_error(r)
  if err then return err end
  if r == n then expire_as(stats, stream) end
  return nil
end

-- Count N expired messages of a queue (see count_in).
local function count_expired(stats, stream, n)
  return count_in(stats, stream, EXPIRED, n)
end
