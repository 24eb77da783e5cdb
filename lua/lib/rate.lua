-- A queue's global rate limit (a library, included after common): x-rate-limit and
-- x-rate-burst from its arguments hash, and a GCRA whose one number of state, the
-- theoretical arrival time (TAT, unix ms on the server's clock), is the string key
-- ks:q:{q}:rate. Why it is correct and what it costs: docs/design.rst, "Global rate limit".
-- KEYS: none of its own; read.lua passes the arguments hash and the rate key of each source.

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

-- The limiter of a queue whose arguments hash is ARGS and rate key KEY at server time NOW
-- (ms): nil without x-rate-limit (one HMGET: all a queue without it pays), else a table
-- {interval, tau, tat, allow, served}: allow is how many deliveries the limiter lets through
-- now (a burst B lets B through at once after a pause, then one per interval). Returns
-- (nil, error, key) when KEY or ARGS holds another type or the stored values cannot be read.
local function rate_open(args, key, now_fn)
  local r, err = try('HMGET', args, RATE_LIMIT, RATE_BURST)
  if err then return nil, err, args end
  if not r or not r[1] then return nil, nil, nil end
  local interval = rate_interval(r[1])
  local burst = r[2] and tonumber(r[2]) or 1
  if not interval or not burst or burst < 1 or burst ~= math.floor(burst) then
    return nil, 'invalid ' .. RATE_LIMIT .. ' ' .. tostring(r[1]) .. ' or ' .. RATE_BURST ..
                ' ' .. tostring(r[2]) .. ' (kombu-streams limits sets valid ones)', args
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
