--[[ migrate_unacked: restore one unacked message of Kombu's Redis transport into our queues.

KEYS[1]       Kombu's unacked hash (delivery tag -> JSON [envelope, exchange, routing key]),
              with Kombu's global_keyprefix, e.g. unacked
KEYS[2]       Kombu's index of it (zset delivery tag -> time), e.g. unacked_index
KEYS[3..]     per target queue (at least one), three keys: the stream of the message's
              priority level, the queue's wake marker and its ready index, e.g.
              ks:q:{celery}:0 ks:q:{celery}:wake ks:q:{celery}:ready
ARGV[1]       the delivery tag
ARGV[2]       the hash value as the caller read it: the message moves only if it is unchanged
ARGV[3]       the message to append to each stream (field "m"): the envelope, marked
              redelivered as Kombu's own restore marks it
Reply:        1 when moved; 0 when the tag is no longer in the hash or holds another value
              (acked, or restored by a Kombu worker, since the caller read it): nothing written
Errors:       "migrate_unacked: expected ..." for another layout; WRONGTYPE (checked first)
Minimum Redis: 6.2. Cost: O(number of target queues). Touches several hash slots: one
server only. The target queues must be declared first. See docs/design.rst (Wake-ups).
]]
--@include common
local bad = check_args('migrate_unacked', #KEYS >= 5 and (#KEYS - 2) % 3 == 0, #ARGV == 3,
                       'KEYS: hash, index, 3 per target queue; ARGV: tag, value, message')
if bad then return bad end
-- every key is checked first (see wrong_type), so a wrong type cannot leave the message in
-- one queue and still unacked
local kinds = {'hash', 'zset'}
for i = 3, #KEYS, 3 do kinds[i], kinds[i + 1], kinds[i + 2] = 'stream', 'zset', 'set' end
for i, key in ipairs(KEYS) do
  local wrong = wrong_type(key, kinds[i])
  if wrong then return redis.error_reply(wrong) end
end
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
for i = 3, #KEYS, 3 do
  redis.call('XADD', KEYS[i], '*', 'm', ARGV[3])
  index_add(KEYS[i + 2], KEYS[i], KEYS[i])
  arm(KEYS[i + 1], KEYS[i])
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
