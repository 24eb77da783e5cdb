-- Shared helpers for the kombu-streams scripts.
-- KEYS: none (a library: kombu_streams.scripts inlines it where a script says "--@include common").
-- ARGV: none. Reply: none. Minimum Redis: 6.2.
-- Each helper hides one difference between Redis versions (6.2, 7.x) or fakeredis, so the
-- scripts themselves read as plain Redis Streams logic.

-- The error message of a redis.pcall reply, or nil. tostring: fakeredis gives r.err as userdata.
local function pcall_error(r)
  if type(r) == 'table' and r.err then return tostring(r.err) end
  return nil
end

-- Run a command that may fail with NOGROUP. Returns (reply, nil), or (nil, nil) when the key or
-- the group does not exist, or (nil, message) on any other error (WRONGTYPE...), which the
-- caller returns with redis.error_reply so the client sees Redis's own message.
local function try(...)
  local r = redis.pcall(...)
  local err = pcall_error(r)
  if err then
    if string.find(err, 'NOGROUP', 1, true) then return nil, nil end
    return nil, err
  end
  return r, nil
end

-- Make sure GROUP exists on an existing stream KEY, starting at its first entry (so messages
-- published before any consumer declared the queue are delivered). Returns true if the stream
-- exists, plus an error message if creating the group failed for another reason (WRONGTYPE).
-- Never creates the stream: a queue deleted elsewhere stays deleted.
local function ensure_group(key, group)
  if redis.call('EXISTS', key) == 0 then return false, nil end
  local err = pcall_error(redis.pcall('XGROUP', 'CREATE', key, group, '0'))
  if err and not string.find(err, 'BUSYGROUP', 1, true) then return false, err end
  return true, nil
end

-- The entries of an XREADGROUP reply for one stream. Real Redis answers {{key, entries}} or
-- nil (false in Lua); fakeredis answers {key, entries} or an empty table.
local function read_entries(reply)
  if type(reply) ~= 'table' or #reply == 0 then return {} end
  if type(reply[1]) == 'table' then return reply[1][2] end
  return reply[2] or {}
end

-- The value of field NAME in a flat {f1, v1, f2, v2, ...} entry, or nil.
local function field(fields, name)
  if type(fields) ~= 'table' then return nil end
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return nil
end

-- Move one entry to the dead-letter stream DLQ and remove it from KEY/GROUP, atomically.
-- FIELDS is the entry's own field list (may be missing or garbled): it is copied as is, so
-- nothing is lost, together with where it came from and why it was set aside.
local function dead_letter(key, group, id, fields, dlq, reason, deliveries)
  local rec = {'reason', reason, 'stream', key, 'group', group, 'id', id,
               'deliveries', tostring(deliveries or 0)}
  if type(fields) == 'table' then
    for i = 1, #fields, 2 do
      if fields[i + 1] ~= nil then
        rec[#rec + 1] = 'f:' .. tostring(fields[i])
        rec[#rec + 1] = fields[i + 1]
      end
    end
  end
  redis.call('XADD', dlq, '*', unpack(rec))
  redis.call('XACK', key, group, id)
  redis.call('XDEL', key, id)
end

-- Set a queue's wake marker WAKE. For an expiring queue (x-expires) the marker gets the time
-- to live of the queue's stream STREAM, so it never outlives the queue.
local function arm(wake, stream)
  redis.call('ZADD', wake, 0, 'w')
  local ttl = redis.call('PTTL', stream)
  if ttl > 0 then redis.call('PEXPIRE', wake, ttl) end
end
