--[[ migrate_unacked: restore one unacked message of Kombu's Redis transport into our queues.

KEYS[1]       Kombu's unacked hash (delivery tag -> JSON [envelope, exchange, routing key]),
              with Kombu's global_keyprefix, e.g. unacked
KEYS[2]       Kombu's index of it (zset delivery tag -> time), e.g. unacked_index
KEYS[3..]     per target queue, three keys: the stream of the message's priority level, the
              queue's wake marker and its ready index, e.g. ks:q:{celery}:0
              ks:q:{celery}:wake ks:q:{celery}:ready
ARGV[1]       the delivery tag
ARGV[2]       the hash value as the caller read it: the message moves only if it is unchanged
ARGV[3]       the message to append to each stream (field "m"): the envelope, marked
              redelivered as Kombu's own restore marks it
Reply:        1 when moved; 0 when the tag is no longer in the hash or holds another value
              (acked, or restored by a Kombu worker, since the caller read it): nothing written
Minimum Redis: 6.2. Cost: O(number of target queues).

The caller decodes the entry and finds its queues through the exchange's bindings, as Kombu's
restore does; this script makes the move atomic: the message is appended to every target
queue and leaves the unacked hash and its index in one step, so an interrupted migration
neither loses nor duplicates it. The target queues must be declared first. An entry routed to
several queues touches several hash slots: Kombu's Redis transport runs on one server, and
migrate requires the same server for both.
]]
--@include common
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
