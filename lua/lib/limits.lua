-- A queue's length limit (a library, included after common): the arguments hash, what counts
-- and which message drop-head sets aside are in docs/design.rst, "Queue arguments and limits".
-- KEYS: none of its own. Each function takes the keys it touches (the queue's arguments hash,
-- streams, delayed set) from its caller, which has them in its KEYS with the queue's tag.

-- Fields of a queue's arguments hash (ks:q:{q}:args) the scripts read.
local MAX_LENGTH, OVERFLOW = 'x-max-length', 'x-overflow'
local MESSAGE_TTL = 'x-message-ttl'  -- ms (docs/design.rst, "Message TTL")

-- Idempotent publish (lua/lib/dedup.lua): read by the same HMGET.
local DEDUP_WINDOW = 'x-deduplication-window'

-- The queue's length limit and overflow from its arguments hash ARGS: (limit, overflow), or
-- (nil, nil) without a limit, or (nil, nil, error) when ARGS holds another type; the fourth
-- value is the queue's message TTL in ms, or nil, the fifth its x-deduplication-window in ms,
-- or nil, the sixth its x-fairness (lua/lib/fair.lua), or nil, then its x-unique-mode and
-- x-unique-ttl (lua/lib/unique.lua) as stored, or nil, and its x-max-length-bytes, or nil
-- (overflow is given with either limit). One HMGET, O(1): all a publish to a queue without
-- arguments pays, and all a keyed one pays for them.
local function read_limit(args)
  local r, err = try('HMGET', args, MAX_LENGTH, OVERFLOW, MESSAGE_TTL, DEDUP_WINDOW,
                     'x-fairness', 'x-unique-mode', 'x-unique-ttl', 'x-max-length-bytes')
  if err then return nil, nil, err end
  if not r then return nil, nil, nil end
  local ttl = r[3] and tonumber(r[3]) or nil
  local window, fairness = tonumber(r[4]), r[5] or nil
  local umode, uttl, bytes = r[6] or nil, r[7] or nil, tonumber(r[8])
  local overflow = (r[1] or bytes) and (r[2] or 'drop-head') or nil
  return tonumber(r[1]), overflow, nil, ttl, window, fairness, umode, uttl, bytes
end

-- What a queue holds, counted against its limit: every entry of its STREAMS (ready and in
-- flight: an ack deletes its entry) plus its delayed messages (the hash BODIES: a retry
-- waiting with x-requeue-delay has a member in the delayed set but no value there, as it is
-- still an entry of its stream). O(levels): XLEN and HLEN are O(1), so the count is exact
-- under every script without a counter to keep. Returns (count) or (nil, error) when one of
-- the keys holds another type: the counts check the types, nothing more is asked.
local function held_count(streams, bodies)
  local n, err = try('HLEN', bodies)
  for _, s in ipairs(streams) do
    if err then break end
    local len
    len, err = try('XLEN', s)
    n = n and len and n + len
  end
  if err then return nil, err end
  return n, nil
end

-- The messages drop-head would set aside, in the order a read would serve them (levels in
-- order, each parked with HOLDER before fresh), nothing changed: a function giving the next
-- as (stream, id, fields, deliveries so far), or nil when no ready message is left (nil and
-- 'looks' when the budget below ran out first: it does not know). Entry
-- SKIP_ID of stream SKIP (a message replace mode replaces) is passed over. Each call costs
-- an XPENDING or XRANGE of one record (an XRANGE more for a parked one); parked records
-- whose entry is gone (Redis 6.2 keeps them) are passed over, at most LOOKS in all.
local function heads(streams, group, holder, skip, skip_id)
  local li, cursor, fresh, looks = 1, '-', false, 200
  return function()
    while li <= #streams and looks > 0 do
      local s = streams[li]
      looks = looks - 1
      if cursor == '-' and not fresh and redis.call('XLEN', s) == 0 then
        li = li + 1  -- also a level never created
      elseif not fresh then
        local p = try('XPENDING', s, group, cursor, '+', 1, holder)
        if p and p[1] then
          cursor = '(' .. p[1][1]
          local e = redis.call('XRANGE', s, p[1][1], p[1][1])[1]
          if e and not (s == skip and e[1] == skip_id) then
            return s, e[1], e[2], tonumber(p[1][4])
          end
        else
          fresh, cursor = true, nil
        end
      else
        if cursor == nil then cursor = '(' .. last_delivered(s, group) end
        local e = redis.call('XRANGE', s, cursor, '+', 'COUNT', 1)[1]
        if e then
          cursor = '(' .. e[1]
          if not (s == skip and e[1] == skip_id) then return s, e[1], e[2], 0 end
        else
          li, cursor, fresh = li + 1, '-', false
        end
      end
    end
    if li <= #streams then return nil, 'looks' end
    return nil
  end
end
