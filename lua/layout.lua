--[[ layout: record the key layout version of a key prefix, or report the one recorded.

KEYS[1]   the layout key of the prefix, <prefix>ks:layout (a string)
ARGV[1]   the layout version this client writes (an integer)
ARGV[2]   optional: "1" the lease keeper's watch for lost data (see the reply), "0" not
ARGV[3..] optional: older versions this client reads as they are (their keys are a subset of
          its layout): one of them found is recorded as ARGV[1]
Reply:    the version recorded before (ARGV[1] when none was, or one of ARGV[3..] was: it is
          recorded now); with ARGV[2] "1", 0 when none was (and ARGV[1] is recorded now)
Errors:   "layout: expected ..." for another call layout; WRONGTYPE when another program
          keeps another type at the key's name
Minimum Redis: 6.2. Cost: O(1 + older versions). Run once per process and prefix when a
channel opens: a client that finds another version stops instead of touching keys it cannot
read. Then at each lease round: a record that vanished means Redis lost data (a restart
without persistence, FLUSHDB, eviction). See docs/design.rst (Key layout).
]]
--@include common
local bad = check_args('layout', #KEYS == 1,
                       #ARGV >= 1 and tonumber(ARGV[1]) ~= nil
                         and (#ARGV == 1 or ARGV[2] == '0' or ARGV[2] == '1'),
                       'KEYS: the layout key; ARGV: the layout version[, watch flag, ' ..
                       'older versions read]')
if bad then return bad end
local found = redis.call('GET', KEYS[1])
if found then
  for i = 3, #ARGV do
    if found == ARGV[i] then  -- a subset of this layout: from now on written as this one
      redis.call('SET', KEYS[1], ARGV[1])
      return ARGV[1]
    end
  end
  return found
end
redis.call('SET', KEYS[1], ARGV[1])
if ARGV[2] == '1' then return 0 end
return ARGV[1]
