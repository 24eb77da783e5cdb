--[[ deadletter: set one delivered entry aside in the queue's dead-letter stream.

KEYS[1]   the stream that holds the entry
KEYS[2]   the queue's dead-letter stream, ks:q:{name}:dlq (for a fanout group on Redis
          Cluster: ks:x:{ex}:dlq:<queue>)
ARGV[1]   consumer group (the queue's name)
ARGV[2]   consumer name: the entry is set aside only while it owns it; one whose lease ran
          out and that another consumer took is left to that one. '' sets it aside whoever
          owns it (operators)
ARGV[3]   entry id
ARGV[4]   reason (free text, e.g. the decoding error)
ARGV[5]   delivery count so far
ARGV[6]   "1" if KEYS[1] is a fanout stream (the entry is only acked there, and the stream
          trimmed), else "0"
          Optional, for an entry with a unique key (x-unique-key): KEYS[3] the queue's key
          store (hash), ks:q:{name}:unique, and ARGV[7] the key, released when the entry is
          set aside (docs/design.rst, Unique keys)
          Optional after those (ARGV[7] then given, '' for no key): ARGV[8] "c", KEYS[4] the
          queue's in-flight flag (string), ks:q:{name}:capped, and KEYS[5] its wake marker:
          an entry set aside frees a slot, so a raised flag is lowered and the marker set
          (x-max-in-flight, docs/design.rst, Global concurrency). The channel always sends it
          for a queue's own streams
Reply:    {moved, not owned}: moved is 1 if the entry was moved, 0 if it no longer exists
          (or, on a fanout stream, is not pending for this group); not owned is 1 when the
          consumer no longer owns it and it was left alone (0 for '')
Errors:   "deadletter: expected ..." for another layout; WRONGTYPE
Minimum Redis: 6.2. Cost: O(fields of the entry), plus O(groups) on a fanout stream; for a
consumer, one XPENDING of its own entry; with "c" a TYPE of the flag (and, raised, of the
marker, a ZADD and a DEL). See docs/design.rst (Delivery counts and dead letters, Leases,
Global concurrency).
]]
--@include common
--@include unique
--@include inflight
local ukey, capped = ARGV[7], ARGV[8] == 'c'
local bad = check_args('deadletter', #KEYS == (ukey and 3 or 2) + (capped and 2 or 0),
                       #ARGV == 6 or #ARGV == 7 or (#ARGV == 8 and capped),
                       'KEYS: stream, dead-letter stream[, key store[, flag, marker]]; ARGV: ' ..
                       'group, consumer, id, reason, count, shared[, unique key[, "c"]]')
if bad then return bad end
local flagged = false  -- x-max-in-flight stopped a read: the slot freed sets the marker
if ukey then  -- before the first write (see wrong_type)
  local wrong = wrong_type(KEYS[3], 'hash')
  if capped and not wrong then
    flagged, wrong = inflight_flagged(KEYS[4])
    if flagged then wrong = wrong_type(KEYS[5], 'zset') end
  end
  if wrong then return redis.error_reply(wrong) end
end
local key, group, me, id, shared = KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[6] == '1'
local owned, stale, oerr = owned_ids(key, group, me, {id})
if oerr then return redis.error_reply(oerr) end
if #owned == 0 then return {0, stale} end  -- another consumer's now, or nothing to do
local found = redis.call('XRANGE', key, id, id)
if #found > 0 and shared and me == '' then
  -- a fanout entry outlives this group's copy: not pending here, it was filed already
  -- (a consumer's own entry is pending: owned_ids saw it)
  local pending, err = try('XPENDING', key, group, id, id, 1)
  if err then return redis.error_reply(err) end
  if pending == nil or #pending == 0 then return {0, 0} end
end
if #found == 0 then
  redis.call('XACK', key, group, id)
  return {0, 0}
end
local err = dead_letter(key, group, id, found[1][2], KEYS[2], ARGV[4], ARGV[5], shared)
if err then return redis.error_reply(err) end
if shared then trim_shared(key) end
if ukey and ukey ~= '' then
  lib_unique().unique_release(KEYS[3], {{ukey, string.match(key, ':(%d+)$') or '0', id}})
end
if flagged then inflight_release(KEYS[4], KEYS[5], key, 0) end
return {1, 0}
