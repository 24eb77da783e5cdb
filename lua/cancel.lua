--[[ cancel: remove delayed messages of ONE queue by label (Celery's task id).

KEYS[1]   the queue's delayed set, ks:q:{queue}:delayed
KEYS[2]   the queue's delayed messages, ks:q:{queue}:delayed:m
KEYS[3]   the queue's big messages (hash): a cancelled big message's body goes too
KEYS[4]   optional: the queue's staging hash (x-fairness): a cancelled message's group
          (field d:<member>) goes too
KEYS[5]   optional, with KEYS[4]: the queue's counters (hash): while they keep its waiting
          bytes (x-max-length-bytes, lua/lib/bytes.lua), the cancelled messages' sizes go
ARGV[1]   ZSCAN cursor: "0" to start, then the one the last call returned
ARGV[2]   COUNT hint of the ZSCAN step: about how many members one call looks at
ARGV[3..] the labels to cancel
Reply:    {next cursor ("0": the scan is done), cancelled member, ...}
Errors:   "cancel: expected ..." for another layout; WRONGTYPE
Minimum Redis: 6.2. Cost: one ZSCAN step plus the removals (an HSTRLEN each, to find big
messages' references without copying a message; with the waiting bytes kept an HEXISTS, an
HMGET of the cancelled ones and an HINCRBY); call again until the cursor is "0".
Why: Celery's revokes live in worker memory for hours only; this removes the message.
See docs/design.rst (Delayed delivery, Big messages).
]]
--@include common
--@include delay
--@include bytes
local bad = check_args('cancel', #KEYS >= 3 and #KEYS <= 5, #ARGV >= 2,
                       'KEYS: delayed set, delayed messages, big messages[, staging hash[, ' ..
                       'counters]]; ' ..
                       'ARGV: cursor, count, labels')
if bad then return bad end
bad = wrong_type(KEYS[1], 'zset') or wrong_type(KEYS[2], 'hash') or wrong_type(KEYS[3], 'hash')
  or (KEYS[4] and wrong_type(KEYS[4], 'hash'))
if bad then return redis.error_reply(bad) end
local wanted = {}
for i = 3, #ARGV do wanted[ARGV[i]] = true end

-- The label of a member "<stamp>:<level>:<label>[:n]" is wanted.
local function is_wanted(member)
  local rest = string.match(member, '^%d+:%d+:(.*)$')
  if rest == nil then return false end
  if wanted[rest] then return true end
  local label = string.match(rest, '^(.*):%d+$')  -- a counter made it unique
  return label ~= nil and wanted[label] == true
end

local step = redis.call('ZSCAN', KEYS[1], ARGV[1], 'COUNT', tonumber(ARGV[2]))
local reply, gone = {step[1]}, {}
for i = 1, #step[2], 2 do
  if is_wanted(step[2][i]) then gone[#gone + 1] = step[2][i] end
end
if #gone > 0 then
  if KEYS[5] and lib_bytes().bytes_kept(KEYS[5]) then  -- x-max-length-bytes: they wait no more
    local bytes = 0
    for _, v in ipairs(redis.call('HMGET', KEYS[2], unpack(gone))) do
      if v then bytes = bytes + lib_bytes().value_bytes(v, KEYS[3]) end
    end
    lib_bytes().bytes_add(KEYS[5], KEYS[5], -bytes)
  end
  local tokens = delayed_tokens(KEYS[2], gone)
  if #tokens > 0 then redis.call('HDEL', KEYS[3], unpack(tokens)) end
  redis.call('ZREM', KEYS[1], unpack(gone))
  redis.call('HDEL', KEYS[2], unpack(gone))
  if KEYS[4] and redis.call('EXISTS', KEYS[4]) == 1 then
    local fields = {}
    for j, m in ipairs(gone) do fields[j] = 'd:' .. m end
    redis.call('HDEL', KEYS[4], unpack(fields))
  end
  for _, m in ipairs(gone) do reply[#reply + 1] = m end
end
return reply
