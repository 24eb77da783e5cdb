--[[ layout: record the key layout version of a key prefix, or report the one recorded.

KEYS[1]   the layout key of the prefix, <prefix>ks:layout (a string)
ARGV[1]   the layout version this client writes (an integer)
Reply:    the version recorded before (ARGV[1] when none was: it is recorded now)
Errors:   "layout: expected ..." for another call layout; WRONGTYPE when another program
          keeps another type at the key's name
Minimum Redis: 6.2. Cost: O(1). Run once per process and prefix when a channel opens: a
client that finds another version stops instead of touching keys it cannot read. See
docs/design.rst (Key layout).
]]
--@include common
local bad = check_args('layout', #KEYS == 1, #ARGV == 1 and tonumber(ARGV[1]) ~= nil,
                       'KEYS: the layout key; ARGV: the layout version')
if bad then return bad end
local found = redis.call('GET', KEYS[1])
if found then return found end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
