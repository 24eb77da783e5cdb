--[[ purge: delete a queue's ready and delayed messages; messages being worked on stay.

KEYS[1..n]  all streams of ONE queue (one per priority level)
KEYS[n+1]   the queue's delayed set
KEYS[n+2]   the queue's delayed messages
ARGV[1]     consumer group (the queue's name)
ARGV[2]     name of the holder consumer that parks requeued messages
ARGV[3]     batch: the most entries to delete from each stream (and the delayed set)
Reply:      {purged, more}: messages deleted, and 1 if a stream or the delayed set had more
            than the batch (call again until more is 0)
Errors:     "purge: expected ..." for another layout; WRONGTYPE (checked before any write)
Minimum Redis: 6.2 (exclusive XRANGE). Cost: O(n + batch) per stream. Ready entries are
those after the group's last-delivered id and those parked with the holder; delivered,
unacked ones stay so their consumers can still ack them. See docs/design.rst (Leases).
]]
--@include common
local bad = check_args('purge', #KEYS >= 3, #ARGV == 3,
                       'KEYS: streams, delayed set, delayed messages; ARGV: group, holder, batch')
if bad then return bad end
local group, holder, batch = ARGV[1], ARGV[2], tonumber(ARGV[3])
local purged, more = 0, 0
local dkey, bodies = KEYS[#KEYS - 1], KEYS[#KEYS]
-- every key is checked first (see wrong_type): no delayed messages gone, then an error
bad = wrong_type(dkey, 'zset') or wrong_type(bodies, 'hash')
bad = bad or wrong_streams(1, #KEYS - 2)
if bad then return redis.error_reply(bad) end
local delayed = redis.call('ZRANGE', dkey, 0, batch - 1)
if #delayed > 0 then
  redis.call('ZREM', dkey, unpack(delayed))
  redis.call('HDEL', bodies, unpack(delayed))
  purged = purged + #delayed
  if #delayed >= batch then more = 1 end
end
for i = 1, #KEYS - 2 do
  local key = KEYS[i]
  local len = redis.call('XLEN', key)
  if len > 0 then
    local summary = try('XPENDING', key, group)
    if summary == nil or tonumber(summary[1]) == 0 then
      -- nobody is working on it: its oldest entries go, at most batch of them (exact MAXLEN
      -- trimming removes from the old end, so this costs O(batch))
      purged = purged + redis.call('XTRIM', key, 'MAXLEN', math.max(len - batch, 0))
      if len > batch then more = 1 end
    else
      local held = redis.call('XPENDING', key, group, '-', '+', batch, holder)
      for _, p in ipairs(held) do
        redis.call('XACK', key, group, p[1])
        purged = purged + redis.call('XDEL', key, p[1])
      end
      if #held >= batch then more = 1 end
      local fresh = redis.call('XRANGE', key, '(' .. last_delivered(key, group), '+', 'COUNT',
                               batch)
      for _, e in ipairs(fresh) do
        purged = purged + redis.call('XDEL', key, e[1])
      end
      if #fresh >= batch then more = 1 end
    end
  end
end
return {purged, more}
