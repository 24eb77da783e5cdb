-- A queue's global rate limit (a library, included after common): x-rate-limit and
-- x-rate-burst from its arguments hash, and a GCRA whose one number of state, the
-- theoretical arrival time (TAT, unix ms on the server's clock), is the string key
-- ks:q:{q}:rate. Why it is correct and what it costs: docs/design.rst, "Global rate limit".
-- KEYS: none of its own; read.lua passes the arguments hash and the rate key of each source.
--
--@lazy: built only when a call needs it; callers write lib_rate().helper(...)
-- (kombu_streams/flatten.py).

local RATE_LIMIT, RATE_BURST = 'x-rate-limit', 'x-rate-burst'
local RATE_PERIOD_MS = {s = 1000, m = 60000, h = 3600000}

-- The ms between two deliveries of rate SPEC, as kombu_streams/limits.py stores it ('50/s',
-- '100/m', '1000/h', '0.5/s'), or nil when it is not one.
local function rate_interval(spec)
  local n, unit = string.match(spec, '^(%d+%.?%d*)/([smh])$')
  n = tonumber(n)
  if not n or n <= 0 then return nil end
  return RATE_PERIOD_MS[unit] / n
end

-- The limiter of a queue whose stored x-rate-limit is LIMIT and x-rate-burst BURST (false
-- or nil when not set: lua/lib/serve.lua reads them with the queue's other limits, one HMGET
-- of its arguments hash ARGS: all a queue without a limit pays), rate key KEY, at server
-- time NOW_FN(): nil without x-rate-limit, else a table {interval, tau, tat, allow,
-- served}: allow is how many deliveries the limiter lets through now (a burst B lets B
-- through at once after a pause, then one per interval). Returns (nil, error, key) when KEY
-- holds another type or the stored values cannot be read.
local function rate_open(limit, burst_value, args, key, now_fn)
  if not limit then return nil, nil, nil end
  local interval = rate_interval(limit)
  local burst = burst_value and tonumber(burst_value) or 1
  if not interval or not burst or burst < 1 or burst ~= math.floor(burst) then
    return nil, 'invalid ' .. RATE_LIMIT .. ' ' .. tostring(limit) .. ' or ' .. RATE_BURST ..
                ' ' .. tostring(burst_value) .. ' (kombu-streams limits sets valid ones)', args
  end
  local stored, gerr = try('GET', key)
  if gerr then return nil, gerr, key end
  local now = now_fn()
  local tat = math.max(tonumber(stored) or 0, now)  -- absent or past: a full burst is free
  local tau = (burst - 1) * interval
  local allow = 0
  if tat - now <= tau then allow = math.floor((now + tau - tat) / interval) + 1 end
  return {interval = interval, tau = tau, tat = tat, allow = allow, served = 0}, nil, nil
end

-- After a read served RATE.served messages at time NOW: the TAT moved on by one interval per
-- delivery, kept until it is past (a key that expired means the same as a TAT <= now), so
-- the key never outlives what it says.
local function rate_save(rate, key, now)
  if rate.served <= 0 then return end
  local tat = rate.tat + rate.served * rate.interval
  redis.call('SET', key, string.format('%.17g', tat), 'PX', math.max(math.ceil(tat - now), 1))
end

-- Ms from NOW until the limiter lets the next delivery through (>= 1), after RATE.served.
local function rate_next(rate, now)
  local at = rate.tat + rate.served * rate.interval - rate.tau
  return math.max(math.ceil(at - now), 1)
end
