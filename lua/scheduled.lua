--[[ scheduled: the next delayed messages of ONE queue, read-only (kombu-streams delayed).

KEYS[1]   the queue's delayed set, ks:q:{queue}:delayed
KEYS[2]   the queue's delayed messages, ks:q:{queue}:delayed:m
ARGV[1]   how many, earliest first
ARGV[2]   "1": with each message's body as stored, "0": without
Reply:    {now, total, member, due ms, message or "", ...}: now is the server's clock in
          unix ms (TIME), total the number of delayed messages
Errors:   "scheduled: expected ..." for another layout; WRONGTYPE
Minimum Redis: 6.2. Cost: O(log n + ARGV[1]). Read-only ("no-writes", EVALSHA_RO on Redis
7). Why: Celery's "inspect scheduled" is empty when tasks wait in Redis; this shows them.
]]
--@flags no-writes
--@include common
local bad = check_args('scheduled', #KEYS == 2, #ARGV == 2,
                       'KEYS: delayed set, delayed messages; ARGV: count, bodies')
if bad then return bad end
local now = now_ms()
local first = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
local reply = {now, redis.call('ZCARD', KEYS[1])}
local members = {}
for i = 1, #first, 2 do members[#members + 1] = first[i] end
local bodies = {}
if ARGV[2] == '1' and #members > 0 then
  bodies = redis.call('HMGET', KEYS[2], unpack(members))
end
for j, m in ipairs(members) do
  reply[#reply + 1] = m
  reply[#reply + 1] = first[2 * j]
  reply[#reply + 1] = bodies[j] or ''
end
return reply
