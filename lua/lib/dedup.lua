-- Idempotent publish (a library, included after common): a queue with the argument
-- x-deduplication-window (ms) stores a message whose x-deduplication-id it stored within the
-- window only once. Why and what it costs: docs/design.rst, "Duplicates".
-- KEYS: none of its own. Each function takes the keys it touches (the queue's id store, its
-- arguments hash, its first stream) from its caller, which has them in its KEYS with the tag.
--
-- The id store, ks:q:{q}:dedup (zset): member id -> the unix ms until which the id is
-- remembered (always > 0); member DEDUP_COUNT -> minus the number of duplicates refused (so it
-- sorts first and no by-score range over (0, ...] ever meets it). No id is empty.
--
--@lazy: built only when a call needs it; callers write lib_dedup().helper(...)
-- (kombu_streams/flatten.py).

local DEDUP_COUNT = ''
-- An argument (limits.py): the most ids a queue remembers; DEDUP_CAP without it.
local DEDUP_MAX_IDS, DEDUP_CAP = 'x-deduplication-max-ids', 100000
-- Most ids one publish forgets: it adds one, so expired ones never pile up while publishes
-- come, and a cap lowered at run time is reached within a few publishes.
local DEDUP_STEP = 10

-- True when STORE remembers ID past NOW (a duplicate), false when not, or (nil, error) when
-- STORE holds another type. One ZSCORE, O(1).
local function dedup_seen(store, id, now)
  local score, err = try('ZSCORE', store, id)
  if err then return nil, err end
  return score ~= false and score ~= nil and tonumber(score) > now, nil
end

-- Count a duplicate refused (the counter shown by `kombu-streams limits` and status).
local function dedup_count(store)
  redis.call('ZINCRBY', store, -1, DEDUP_COUNT)
end

-- Remember ID in STORE until NOW + WINDOW, after forgetting up to DEDUP_STEP expired ids,
-- and then the oldest ones over the queue's cap (ARGS: its arguments hash). STORE expires
-- when the last id it remembers does, or with the queue (FIRST: its first stream's expiry,
-- x-expires), whichever is later. O(log n) plus at most 2 x DEDUP_STEP removals.
local function dedup_remember(store, id, now, window, args, first)
  local old = redis.call('ZRANGEBYSCORE', store, '(0', now, 'LIMIT', 0, DEDUP_STEP)
  if #old > 0 then redis.call('ZREM', store, unpack(old)) end
  redis.call('ZADD', store, now + window, id)
  local n = redis.call('ZCARD', store)
  local cap = tonumber(redis.call('HGET', args, DEDUP_MAX_IDS)) or DEDUP_CAP
  if n > cap and redis.call('ZSCORE', store, DEDUP_COUNT) then n = n - 1 end
  if n > cap then  -- the oldest first: those soonest forgotten anyway
    local over = redis.call('ZRANGEBYSCORE', store, '(0', '+inf', 'LIMIT', 0,
                            math.min(n - cap, DEDUP_STEP))
    if #over > 0 then redis.call('ZREM', store, unpack(over)) end
  end
  local ttl, want = redis.call('PTTL', store), math.max(window, redis.call('PTTL', first))
  if want > ttl then redis.call('PEXPIRE', store, want) end
end
