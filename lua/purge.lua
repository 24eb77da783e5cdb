--[[ purge: delete a queue's ready and delayed messages, and retries waiting with
x-requeue-delay; messages being worked on stay.

KEYS[1..n]  all streams of ONE queue (one per priority level)
KEYS[n+1]   the queue's delayed set
KEYS[n+2]   the queue's delayed messages
KEYS[n+3]   the queue's big messages (hash): the bodies of those deleted are deleted too
KEYS[n+4]   the queue's key store (hash, x-unique-key): the keys of the delayed and staged
            messages deleted are released (a stream entry's key is free once its entry is
            gone: docs/design.rst, Unique keys)
KEYS[n+5]   the queue's staging hash (x-fairness), ks:q:{celery}:fair: up to batch staged
            messages go too (over all levels), in rotation order (lua/lib/fair.lua), and the
            groups (d:<member>) of the delayed messages deleted
KEYS[n+6]   the queue's counters (hash): while they keep its waiting bytes
            (x-max-length-bytes, lua/lib/bytes.lua), the call that leaves nothing waiting (more
            0) sets them to 0; the calls before leave them as they were
ARGV[1]     consumer group (the queue's name)
ARGV[2]     name of the holder consumer that parks requeued messages
ARGV[3]     batch: the most entries to delete from each stream (and the delayed set)
Reply:      {purged, more}: messages deleted, and 1 if a stream or the delayed set had more
            than the batch, or the call stopped on its byte bound (call again until more is 0)
Errors:     "purge: expected ..." for another layout; WRONGTYPE (checked before any write)
Minimum Redis: 6.2 (exclusive XRANGE). Cost: O(n + batch) per stream, and an XPENDING of
one id, XACK and XDEL per waiting retry among the batch of delayed members. Ready entries are
those after the group's last-delivered id and those parked with the holder; delivered,
unacked ones stay so their consumers can still ack them. Entries it must read (the ready
ones of a stream some consumer works on; every one it deletes while the queue has big
messages, to find their tokens) are read in pages until about COPY_BYTES (4 MiB) were
copied, then the call stops with more = 1; delayed values are read only when short enough
to be a big message's reference; the last call an HSET of the waiting bytes. See
docs/design.rst (Leases, Big messages).
]]
--@include common
--@include delay
--@include unique
--@include fair
--@include bytes
local bad = check_args('purge', #KEYS >= 7, #ARGV == 3,
                       'KEYS: streams, delayed set, delayed messages, big messages, key ' ..
                       'store, staging hash, counters; ARGV: group, holder, batch')
if bad then return bad end
local group, holder, batch = ARGV[1], ARGV[2], tonumber(ARGV[3])
local purged, more = 0, 0
local n = #KEYS - 6
local dkey, bodies, big, ustore = KEYS[n + 1], KEYS[n + 2], KEYS[n + 3], KEYS[n + 4]
local staging = KEYS[n + 5]
-- every key is checked first (see wrong_type): no delayed messages gone, then an error
bad = wrong_type(dkey, 'zset') or wrong_type(bodies, 'hash') or wrong_type(big, 'hash')
  or wrong_type(ustore, 'hash') or wrong_type(staging, 'hash')
bad = bad or wrong_streams(1, n)
if bad then return redis.error_reply(bad) end
local has_big = redis.call('EXISTS', big) == 1
local free = {}  -- tokens of big messages deleted: their bodies go too

local COPY_BYTES = 4 * 1024 * 1024
local copied = 0  -- bytes of entries read so far

-- Note the token of big message entry E (an XRANGE record), and count what was copied.
local function look_at(e)
  for _, v in ipairs(e[2]) do copied = copied + #v end
  local token = field(e[2], 'r')
  if token then free[#free + 1] = token end
end

-- Up to N entries of stream KEY from START ('-', or '(' .. id), in pages of at most 100,
-- until about COPY_BYTES were copied in this call; and whether the bytes cut it short.
local function entries_from(key, start, want)
  local out = {}
  while #out < want do
    if copied >= COPY_BYTES then return out, true end
    local page_size = math.min(100, want - #out)
    local page = redis.call('XRANGE', key, start, '+', 'COUNT', page_size)
    for _, e in ipairs(page) do
      out[#out + 1] = e[1]
      look_at(e)
    end
    if #page < page_size then break end
    start = '(' .. page[#page][1]
  end
  return out, false
end

-- A retry waiting with x-requeue-delay (a pointer member, lua/lib/delay.lua park_pointer) is
-- a message of the queue too: its entry, parked with BACKOFF, goes with its pointer (else
-- reclaim would give it back after a lease). One still owned by another consumer stays.
local levels = {}
for i = 1, n do levels[string.match(KEYS[i], ':(%d+)$') or ''] = KEYS[i] end
local function drop_retry(member)
  local level, id, _, owner_group = pointer_parts(member)
  local key = level and levels[level]
  if not key or not backoff_owns(key, owner_group, id) then return end
  if has_big then
    local e = redis.call('XRANGE', key, id, id)[1]
    if e then look_at(e) end
  end
  redis.call('XACK', key, owner_group, id)
  redis.call('XDEL', key, id)
end

local delayed = redis.call('ZRANGE', dkey, 0, batch - 1)
if #delayed > 0 then
  for _, member in ipairs(delayed) do
    drop_retry(member)  -- a delayed message's member is no pointer: nothing
  end
  if has_big then
    for _, token in ipairs(delayed_tokens(bodies, delayed)) do free[#free + 1] = token end
  end
  redis.call('ZREM', dkey, unpack(delayed))
  if redis.call('EXISTS', ustore) == 1 then  -- one command per call without unique keys
    local unique = lib_unique()
    for _, member in ipairs(delayed) do unique.unique_release_waiting(ustore, 'd', member) end
  end
  redis.call('HDEL', bodies, unpack(delayed))
  if redis.call('EXISTS', staging) == 1 then  -- x-fairness: their groups (d:<member>) go
    local fields = {}
    for j, member in ipairs(delayed) do fields[j] = 'd:' .. member end
    redis.call('HDEL', staging, unpack(fields))
  end
  purged = purged + #delayed
  if #delayed >= batch then more = 1 end
end
for i = 1, n do
  local key = KEYS[i]
  local len = redis.call('XLEN', key)
  if len > 0 then
    local summary = try('XPENDING', key, group)
    if (summary == nil or tonumber(summary[1]) == 0) and not has_big then
      -- nobody is working on it: its oldest entries go, at most batch of them (exact MAXLEN
      -- trimming removes from the old end, so this costs O(batch))
      purged = purged + redis.call('XTRIM', key, 'MAXLEN', math.max(len - batch, 0))
      if len > batch then more = 1 end
    elseif summary == nil or tonumber(summary[1]) == 0 then
      -- the same, read first for the tokens of big messages among them
      local ids, cut = entries_from(key, '-', batch)
      if #ids > 0 then purged = purged + redis.call('XDEL', key, unpack(ids)) end
      if cut or len > #ids then more = 1 end
    else
      local held = redis.call('XPENDING', key, group, '-', '+', batch, holder)
      for j, p in ipairs(held) do
        if has_big and copied >= COPY_BYTES then
          more = 1
          break
        end
        if has_big then
          local e = redis.call('XRANGE', key, p[1], p[1])[1]
          if e then look_at(e) end
        end
        redis.call('XACK', key, group, p[1])
        purged = purged + redis.call('XDEL', key, p[1])
        if j == #held and #held >= batch then more = 1 end
      end
      local fresh, cut = entries_from(key, '(' .. last_delivered(key, group), batch)
      for _, id in ipairs(fresh) do
        purged = purged + redis.call('XDEL', key, id)
      end
      if cut or #fresh >= batch then more = 1 end
    end
  end
end
-- Fair share: staged messages are ready ones not in a stream yet (their big bodies freed
-- as they go, in fair_drop), at most batch of them per call over all levels
if redis.call('EXISTS', staging) == 1 then
  local budget, fair, fields = batch, lib_fair(), {}  -- fields: those dropped
  for i = 1, n do
    local level, dropped, left = fair.fair_level(KEYS[i]), 0, nil
    if budget > 0 then
      dropped, left = fair.fair_drop(staging, level, budget, big, fields)
    else
      left = redis.call('HEXISTS', staging, 'c:' .. level) == 1
    end
    purged, budget = purged + dropped, budget - dropped
    if left then more = 1 end
  end
  if #fields > 0 and redis.call('EXISTS', ustore) == 1 then  -- the keys they held go
    local unique = lib_unique()
    for _, f in ipairs(fields) do unique.unique_release_waiting(ustore, 'g', f) end
  end
end
chunked('HDEL', big, free)
-- nothing waits now (its count of bytes is right again, lua/lib/bytes.lua)
if more == 0 then lib_bytes().bytes_reset(KEYS[n + 6]) end
return {purged, more}
