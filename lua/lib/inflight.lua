-- A queue's global concurrency limit (a library, included after common): x-max-in-flight = N
-- caps the queue's messages delivered and not yet settled at N, over every consumer and
-- process. What is in flight: the pending entries of the queue's group over its streams,
-- less those parked by a consumer whose name starts with '~' (the holder of requeued
-- messages, ~backoff, ~unfiled), counted with XPENDING's summary form (one command per
-- stream). Counted only near the limit: the field in-flight-bound of the queue's counters
-- hash keeps an upper bound of the pending entries, parked ones included (reads add what
-- they deliver, the acks riding in a read take off what XACK freed, whoever held it; every
-- other settle leaves it high). A read trusts it while it leaves room for the whole call,
-- else counts and keeps the count, so a read stops at the limit only on an exact count, and
-- a bound that went high (acks outside reads, parked messages, keys changed behind our back)
-- costs a count, never a message. The flag ks:q:{q}:capped (a string) says a read left
-- ready work without a marker at the cap; a settle that frees a slot and finds it lowers it
-- and sets the marker. Why it holds, and what it costs: docs/design.rst, "Global
-- concurrency". KEYS: none of its own; the callers pass the flag, marker, counters, streams.

local MAX_IN_FLIGHT = 'x-max-in-flight'
local IN_FLIGHT_BOUND = 'in-flight-bound'  -- the field of the counters hash (see the top)
-- Longest a flag lives (ms): a safety net for a queue deleted or expired while capped. Every
-- capped read sets it again, and so does the sweep of each idle consumer (docs/design.rst).
local CAPPED_TTL = 3600000

-- The limit stored as VALUE (an integer >= 1), or nil and the error naming it (NAME, default
-- x-max-in-flight: x-group-max-in-flight is read the same way).
local function inflight_max(value, name)
  local n = tonumber(value)
  if not n or n < 1 or n ~= math.floor(n) then
    return nil, 'invalid ' .. (name or MAX_IN_FLIGHT) .. ' ' .. tostring(value) ..
                ' (kombu-streams limits sets valid ones)'
  end
  return n, nil
end

-- The messages of GROUP in flight on the streams KEYS[i], i in STREAMS: their pending
-- entries less those parked by a '~' consumer. Returns the count and all the pending
-- entries (parked ones too: what the kept bound bounds), or (nil, nil, error, key) when a
-- stream holds another type. One XPENDING summary per stream: O(consumers of the group with
-- entries pending), bounded since reclaim removes idle consumers.
local function inflight_count(streams, group)
  local n, pending = 0, 0
  for _, i in ipairs(streams) do
    local s, err = try('XPENDING', KEYS[i], group)  -- no stream or group: nil, nothing
    if err then return nil, nil, err, KEYS[i] end
    if s and (tonumber(s[1]) or 0) > 0 then
      n, pending = n + tonumber(s[1]), pending + tonumber(s[1])
      for _, c in ipairs(s[4] or {}) do
        if string.sub(c[1], 1, 1) == '~' then n = n - tonumber(c[2]) end
      end
    end
  end
  return n, pending
end

-- The bound of the pending entries that COUNTERS keeps (an integer >= 0), or nil when it
-- keeps none: no field, a value that is not one, or another type at COUNTERS (then a read
-- counts).
local function inflight_bound(counters)
  local v = tonumber(redis.pcall('HGET', counters, IN_FLIGHT_BOUND))
  if v and v >= 0 and v == math.floor(v) then return v end
  return nil
end

-- Keep BOUND in COUNTERS (OLD: the value read before, nil when none). A hash created here
-- gets the expiry of the queue's first stream STREAM (x-expires), as count_in gives its
-- counters; a COUNTERS of another type is left alone (reads then count every time).
local function inflight_keep(counters, stream, bound, old)
  if bound == old then return end
  if redis.pcall('HSET', counters, IN_FLIGHT_BOUND, bound) == 1 then  -- maybe a new hash
    expire_as(counters, stream)
  end
end

-- Whether the flag KEY is raised (one TYPE: what a settle of a queue without the limit
-- pays): true, false, or (nil, error) when KEY holds another type.
local function inflight_flagged(key)
  local t = redis.call('TYPE', key)['ok']
  if t == 'none' then return false, nil end
  if t == 'string' then return true, nil end
  return nil, 'WRONGTYPE ' .. key .. ' holds a ' .. t .. ', not a string'
end

-- A read stopped by the limit with ready work left: raise the flag KEY, expiring with the
-- queue's marker (TTL ms, 0: none) but after CAPPED_TTL at the latest. Returns nil, or the
-- error when KEY holds another type (then nothing was written).
local function inflight_raise(key, ttl)
  local _, err = inflight_flagged(key)
  if err then return err end
  ttl = tonumber(ttl) or 0
  if ttl <= 0 or ttl > CAPPED_TTL then ttl = CAPPED_TTL end
  redis.call('SET', key, '1', 'PX', ttl)
  return nil
end

-- A settle freed slots of a queue whose flag KEY is raised: lower it and set the queue's
-- marker WAKE (STREAM, TTL as common's arm takes them), so a waiting consumer reads. Returns
-- nil, or the marker's error (a caller that checked its type first meets none).
local function inflight_release(key, wake, stream, ttl)
  local err = arm(wake, stream, ttl)
  if err then return err end
  redis.call('DEL', key)
  return nil
end
