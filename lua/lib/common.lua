-- Shared helpers of the scripts (a library: inlined where a script says "--@include common").
-- Each hides a difference between Redis 6.2, 7.x and fakeredis, or a rule every script keeps
-- (docs/design.rst, "Every script" and "Redis Cluster and supported servers").

-- Unless KEYS_OK and ARGS_OK (the script's own test of #KEYS and #ARGV), an error reply that
-- names script NAME and what it EXPECTED; else nil. Called first, so a missing argument gives
-- this error rather than a Lua error at a line of the flattened text.
local function check_args(name, keys_ok, args_ok, expected)
  if keys_ok and args_ok then return nil end
  return redis.error_reply(name .. ': expected ' .. expected .. '; got ' .. #KEYS ..
                           ' keys, ' .. #ARGV .. ' args')
end

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

-- Like try, for XREADGROUP: a missing stream is also (nil, nil). Real Redis says NOGROUP for
-- it; fakeredis says "The XGROUP subcommand requires the key to exist".
local function try_read(...)
  local r, err = try(...)
  if err and string.find(err, 'requires the key to exist', 1, true) then return nil, nil end
  return r, err
end

-- Members of a queue's ready index besides stream keys: HELD .. key (the holder may have
-- entries parked there), COMPLETE (a walk saw every stream). docs/design.rst, "The ready index".
local HELD, COMPLETE = 'h:', ''

-- Redis command CMD on KEY with the items of LIST, at most 1,000 per call (unpack() has a
-- limit; 1,000 is even, so HSET's field-value pairs stay whole).
local function chunked(cmd, key, list)
  for j = 1, #list, 1000 do
    redis.call(cmd, key, unpack(list, j, math.min(j + 999, #list)))
  end
end

-- Give KEY, a key of a queue a script just made, the expiry of the queue's STREAM (its
-- first stream: x-expires), if it has one, so it goes with an expiring queue.
local function expire_as(key, stream)
  local ttl = redis.call('PTTL', stream)
  if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
end

-- Add MEMBERS to the ready index INDEX; a new member gives INDEX the expiry of STREAM.
local function index_add(index, stream, ...)
  if redis.call('SADD', index, ...) > 0 then expire_as(index, stream) end
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

-- Stream id ID ("ms-seq", or "ms" for "ms-0") as two numbers, or nil when it is not one
-- (digits only: tonumber alone would take "1e0" or "0x1"). A caller comparing many ids
-- parses each once and compares the numbers (the unique key store's sweep).
local function id_parts(id)
  local ms, seq = string.match(id, '^(%d+)%-?(%d*)$')
  if not ms or (seq == '' and string.sub(id, -1) == '-') then return nil end
  return tonumber(ms), tonumber(seq) or 0
end

-- True when stream id A sorts before stream id B.
local function id_before(a, b)
  local ams, aseq = id_parts(a)
  local bms, bseq = id_parts(b)
  if ams ~= bms then return ams < bms end
  return (aseq or 0) < (bseq or 0)
end

-- GROUP's last-delivered id on stream KEY ('0-0' without that group) and its XINFO GROUPS
-- record (nil without it).
local function last_delivered(key, group)
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do
    if field(g, 'name') == group then return field(g, 'last-delivered-id'), g end
  end
  return '0-0', nil
end

-- Trim fanout STREAM below what every group is done with (nothing kept without groups; a
-- missing stream left alone); returns the entries trimmed. docs/design.rst, "Fanout".
local function trim_shared(stream)
  if redis.call('EXISTS', stream) == 0 then return 0 end
  local groups = redis.call('XINFO', 'GROUPS', stream)
  if #groups == 0 then return redis.call('XTRIM', stream, 'MAXLEN', 0) end
  local keep = nil
  for _, g in ipairs(groups) do
    local mark
    if tonumber(field(g, 'pending')) > 0 then  -- it still needs its oldest pending entry
      mark = redis.call('XPENDING', stream, field(g, 'name'), '-', '+', 1)[1][1]
    else  -- it is done with everything it was delivered: keep what comes after
      local ms, seq = string.match(field(g, 'last-delivered-id'), '^(%d+)-(%d+)$')
      mark = ms .. '-' .. string.format('%d', tonumber(seq) + 1)
    end
    if keep == nil or id_before(mark, keep) then keep = mark end
  end
  return redis.call('XTRIM', stream, 'MINID', keep)
end

-- Move entry ID (its FIELDS, copied as is) of KEY/GROUP to dead-letter stream DLQ; SHARED: a
-- fanout stream, only acked (the caller trims it, once per call, with trim_shared). Returns
-- nil, or DLQ's error (then nothing changed).
-- docs/design.rst, "Delivery counts and dead letters".
local function dead_letter(key, group, id, fields, dlq, reason, deliveries, shared)
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
  local err = pcall_error(redis.pcall('XADD', dlq, '*', unpack(rec)))
  if err then return err end
  redis.call('XACK', key, group, id)
  if not shared then redis.call('XDEL', key, id) end  -- shared: the caller trims, once
  return nil
end

-- An error message when KEY exists and holds another type than KIND, else nil. A script that
-- writes several keys checks them all first (docs/design.rst, "Every script").
local function wrong_type(key, kind)
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'none' and t ~= kind then
    return 'WRONGTYPE ' .. key .. ' holds a ' .. t .. ', not a ' .. kind
  end
  return nil
end

-- The first WRONGTYPE error among KEYS[FIRST..LAST], which must be streams (or absent), or
-- nil: the types-first check of a script's streams.
local function wrong_streams(first, last)
  for i = first, last do
    local wrong = wrong_type(KEYS[i], 'stream')
    if wrong then return wrong end
  end
  return nil
end

-- Set wake marker WAKE (docs/design.rst, "Wake-ups"), expiring after TTL ms when TTL > 0,
-- else, when new, with STREAM. Returns nil, or the error when WAKE holds another type.
local function arm(wake, stream, ttl)
  local added = redis.pcall('ZADD', wake, 0, 'w')
  local err = pcall_error(added)
  if err then return err end
  ttl = tonumber(ttl) or 0
  if ttl <= 0 then
    if added == 0 then return nil end  -- it was set, with the queue's expiry (if any)
    ttl = redis.call('PTTL', stream)
  end
  if ttl > 0 then redis.call('PEXPIRE', wake, ttl) end
  return nil
end

-- Parks an entry the dead-letter stream could not take; reclaim gives it back after a lease.
local UNFILED = '~unfiled'

-- The server's clock in unix ms (TIME): the one clock every client agrees on.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Ack IDS of stream KEY for GROUP, deleting those the group had delivered (docs/design.rst,
-- "Leases"). Returns the number that were pending. One XACK and one XDEL per 1,000 ids.
-- DELETED, when given, is a set that gets each id deleted (ack.lua frees their big bodies).
local function ack_ids(key, group, all, deleted)
  local done = 0
  for first = 1, #all, 1000 do  -- unpack() has a limit
    local ids = {unpack(all, first, math.min(first + 999, #all))}
    local acked = redis.call('XACK', key, group, unpack(ids))
    done = done + acked
    local gone = {}
    if acked == #ids then
      redis.call('XDEL', key, unpack(ids))
      gone = ids
    elseif acked > 0 then  -- some were not pending: delete only the delivered ones
      local last = last_delivered(key, group)
      for _, id in ipairs(ids) do
        if not id_before(last, id) then gone[#gone + 1] = id end
      end
      if #gone > 0 then redis.call('XDEL', key, unpack(gone)) end
    end
    if deleted then
      for _, id in ipairs(gone) do deleted[id] = true end
    end
  end
  return done
end

-- Of IDS (entry ids of stream KEY, as Redis gives them: "ms-seq"), the ones CONSUMER still
-- owns in GROUP's PEL, in the order given (each once), and how many it does not own (its
-- lease ran out and another consumer took the entry, or it was settled already). A settle
-- leaves the others alone, so a stale consumer cannot take a message from its current owner
-- (docs/design.rst, "Leases"). CONSUMER '' means any owner (operators): IDS as given, no
-- command. Else one XPENDING of CONSUMER's own entries from the lowest to the highest id,
-- paged, that stops once every id is found: O(ids + entries CONSUMER owns in that range).
-- No stream or group: nothing to settle, ({}, 0). Another error (WRONGTYPE): (nil, 0, err),
-- so a caller that asks before its first write has checked the stream's type too.
local function owned_ids(key, group, consumer, ids)
  if consumer == '' then return ids, 0, nil end
  local want, n, lo, hi = {}, 0, nil, nil
  for _, id in ipairs(ids) do
    if not string.match(id, '^%d+%-?%d*$') then
      return nil, 0, 'ERR Invalid stream ID specified as stream command argument: ' .. id
    end
    if not want[id] then
      want[id], n = true, n + 1
      if lo == nil or id_before(id, lo) then lo = id end
      if hi == nil or id_before(hi, id) then hi = id end
    end
  end
  local owned, found, start, page = {}, {}, lo, n + 100
  local left = n
  while left > 0 do
    local p, err = try('XPENDING', key, group, start, hi, page, consumer)
    if err then return nil, 0, err end
    if p == nil then return {}, 0, nil end  -- no stream or group: nothing to settle
    for _, e in ipairs(p) do
      if want[e[1]] and not found[e[1]] then found[e[1]], left = true, left - 1 end
    end
    if #p < page then break end
    start = '(' .. p[#p][1]
  end
  for _, id in ipairs(ids) do
    if found[id] then
      owned[#owned + 1], found[id] = id, nil
    end
  end
  return owned, left, nil
end

-- Ack pairs in ARGV[FIRST..LAST] (LAST nil: to the end) (stream index k, entry id), by
-- stream: {ids to look up, ids trusted} per k, and the ks in first-seen order; nil and the
-- offending ARGV position when a k is not an index 1..N. A negative k marks an entry the
-- consumer knows it still owns: by its own clock it read or renewed it less than half a lease
-- ago, so no reclaim can have taken it (docs/design.rst, "Leases"); it is acked without the
-- ownership lookup.
local function ack_pairs(first, n, last)
  local by, order = {}, {}
  for j = first, last or #ARGV, 2 do
    local k = tonumber(ARGV[j])
    local trusted = k ~= nil and k < 0
    if trusted then k = -k end
    if k == nil or k < 1 or k > n or k % 1 ~= 0 then return nil, nil, j end
    if not by[k] then
      by[k] = {{}, {}}
      order[#order + 1] = k
    end
    local ids = by[k][trusted and 2 or 1]
    ids[#ids + 1] = ARGV[j + 1]
  end
  return by, order
end

-- The ids of BY (one stream's entry of ack_pairs) CONSUMER may ack: the trusted ones and
-- those of the others it still owns (owned_ids), how many it does not own, or an error.
local function ackable(key, group, consumer, by)
  local owned, lost, err = {}, 0, nil
  if #by[1] > 0 then owned, lost, err = owned_ids(key, group, consumer, by[1]) end
  if err then return nil, 0, err end
  for _, id in ipairs(by[2]) do owned[#owned + 1] = id end
  return owned, lost, nil
end
