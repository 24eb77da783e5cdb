--[[ redrive: move dead letters back to their queue, oldest first; a letter whose message
holds an x-unique-key takes the key back, or stays while a live message holds it.

KEYS[1]     the queue's dead-letter stream, ks:q:{name}:dlq
KEYS[2..n]  all streams of the queue (one per priority level)
KEYS[n+1]   the queue's wake marker (zset)
KEYS[n+2]   the queue's ready index (set)
KEYS[n+3..n+6]  only with ARGV[2] "k": the queue's key store (hash), ks:q:{name}:unique,
            its arguments (hash), ks:q:{name}:args (x-unique-ttl), its delayed set (zset),
            ks:q:{name}:delayed, and its staging hash, ks:q:{name}:fair (a staged message
            holding the key is looked at there)
KEYS[n+7..n+8]  with those: the queue's counters (hash) and big messages (hash): on a queue
            with x-max-length-bytes each message that goes back adds its size to the bytes
            waiting (lua/lib/bytes.lua; never refused for them, as a requeue is not)
ARGV[1]     the most dead letters to move in this call
ARGV[2..]   optional: only these dead-letter ids, in this order (otherwise the oldest
            ones); an id given twice counts once, an id not in the stream is ignored.
            Or ARGV[2] "k", ARGV[3] the consumer group (the queue's name), then triples:
            dead-letter id, the x-unique-key its message holds ('' for none) and its
            x-group ('' for none; the caller read both from the letter, kombu_streams/
            unique.py's unique_key and fair.py's group). A letter with a key goes back only
            while no live message of the queue holds that key, and then holds it as a
            publish would (x-unique-ttl as the queue has it now); else it stays, counted as
            held. On a queue with x-fairness a letter is staged in its group (KEYS[n+6]), as
            a publish would stage it, and takes its group's turn. Without "k" every letter
            goes back to its stream without its key (docs/design.rst, Unique keys)
Reply:      {moved, skipped, held}: skipped counts dead letters that hold no message (an
            entry that was never a Kombu message) or came from a stream of another queue;
            held those whose key a live message holds (with "k" only); both stay in the
            dead-letter stream
Errors:     "redrive: expected ..." for another layout; WRONGTYPE (checked before any write)
Minimum Redis: 6.2. Cost: O(count), or O(number of ids given); with "k" a letter with a key
adds what a keyed publish's look at the key costs (an HGET, then an XRANGE of one id and
XINFO GROUPS, a ZSCORE or an HEXISTS) and an HSET, and the call an HMGET of the arguments.
A letter goes back to the stream it came from as a new entry (a fresh delivery count), or
staged in its group on a fair queue (a few hash commands: lua/lib/fair.lua); a big
message's (f:r) as its token, its body left in the queue's big hash. See docs/design.rst
(Delivery counts and dead letters, Unique keys, Fair share). With x-max-length-bytes ("k")
an HINCRBY, and an HSTRLEN per big message.
]]
--@include common
--@include delay
--@include bytes
--@include unique
--@include fair
local keyed = ARGV[2] == 'k'  -- triples (id, key, group) from ARGV[4], more keys in KEYS
local bad = check_args('redrive', #KEYS >= (keyed and 10 or 4),
                       #ARGV >= 1 and (not keyed or (#ARGV >= 3 and (#ARGV - 3) % 3 == 0)),
                       'KEYS: dlq, streams, marker, index[, key store, arguments, delayed ' ..
                       'set, staging hash, counters, big messages]; ARGV: count[, ids], or ' ..
                       'count, "k", group, then triples: id, key, x-group')
if bad then return bad end
local n = #KEYS - (keyed and 8 or 2)
local limit = tonumber(ARGV[1])
local store, argkey, dkey, staging = KEYS[n + 3], KEYS[n + 4], KEYS[n + 5], KEYS[n + 6]
-- every key is checked first (see wrong_type): no letter moved without its marker
local wrong = wrong_type(KEYS[1], 'stream') or wrong_type(KEYS[n + 1], 'zset')
  or wrong_type(KEYS[n + 2], 'set')
wrong = wrong or wrong_streams(2, n)
if keyed then
  wrong = wrong or wrong_type(store, 'hash') or wrong_type(argkey, 'hash')
          or wrong_type(dkey, 'zset') or wrong_type(staging, 'hash')
end
if wrong then return redis.error_reply(wrong) end
if limit <= 0 then return {0, 0, 0} end  -- XRANGE COUNT 0 answers nil on Redis
local counters, bighash = KEYS[n + 7], KEYS[n + 8]
local sized, grown = false, 0  -- x-max-length-bytes: each message back waits again
local entries
local key_of, group_of = {}, {}  -- dead-letter id -> its message's key, group ("k" form)
if #ARGV > 1 then
  entries = {}
  local wanted = {}
  local first, step = 2, 1
  if keyed then first, step = 4, 3 end
  for j = first, #ARGV, step do
    local found = redis.call('XRANGE', KEYS[1], ARGV[j], ARGV[j])
    -- an id given twice is moved once (XRANGE normalizes it, e.g. "5" and "5-0")
    if found[1] and not wanted[found[1][1]] then
      wanted[found[1][1]] = true
      entries[#entries + 1] = found[1]
      if keyed and ARGV[j + 1] ~= '' then key_of[found[1][1]] = ARGV[j + 1] end
      if keyed then group_of[found[1][1]] = ARGV[j + 2] end
    end
  end
else
  entries = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', limit)
end
local moved, skipped, held = 0, 0, 0
local added, members = {}, {}  -- ready index members of the streams that got letters
local levels, uttl, unique = {}, 0, nil  -- level -> stream; x-unique-ttl (ms)
local fair = nil  -- x-fairness: a letter is staged in its group, and takes its turn
if keyed then
  local conf = redis.call('HMGET', argkey, 'x-unique-ttl', 'x-fairness', 'x-max-length-bytes')
  uttl = math.max(math.floor(tonumber(conf[1]) or 0), 0)
  fair = conf[2] and lib_fair() or nil
  sized = conf[3] ~= false  -- counted as a publish counts (lua/lib/bytes.lua)
end
if next(key_of) ~= nil then
  for i = 2, n do levels[string.match(KEYS[i], ':(%d+)$') or ''] = KEYS[i] end
  unique = lib_unique()
end
for _, e in ipairs(entries) do
  if moved >= limit then break end
  -- a big message's letter holds its token (f:r): it goes back as such, its body stays put
  local name, payload = 'm', field(e[2], 'f:m')
  if payload == nil then name, payload = 'r', field(e[2], 'f:r') end
  local origin = field(e[2], 'stream')
  local target = nil
  for i = 2, n do
    if KEYS[i] == origin then target = KEYS[i] end
  end
  local key, state, ref = key_of[e[1]], nil, nil
  if payload and target and key then  -- a live message holding the key keeps it
    local err
    state, ref, _, _, err = unique.unique_holder(store, key, levels, dkey, ARGV[3], now_ms,
                                                 staging)
    state = state or err  -- (types were checked first) a key not looked at is not taken
  end
  if state then
    held = held + 1
  elseif payload and target then
    local level, id, staged, member = string.match(target, ':(%d+)$') or '0', nil, nil, target
    if fair then  -- as a publish stages it (lua/lib/fair.lua), without its old deadline
      local _, _, f = fair.fair_stage(staging, level, group_of[e[1]] or '',
                                      name == 'r' and 'r:' .. payload or payload)
      staged, member = f, FAIR .. target
      if not key then redis.pcall('HDEL', store, 'g:' .. f) end  -- a stale reverse field
    else
      id = redis.call('XADD', target, '*', name, payload)
    end
    redis.call('XDEL', KEYS[1], e[1])
    local ttl = redis.call('PTTL', KEYS[2])  -- what it made goes with an expiring queue
    if key then
      unique.unique_hold(store, key, uttl, level, id, nil, ref, staged)
      if ttl > 0 and redis.call('PTTL', store) == -1 then redis.call('PEXPIRE', store, ttl) end
    end
    if fair and ttl > 0 and redis.call('PTTL', staging) == -1 then
      redis.call('PEXPIRE', staging, ttl)
    end
    if not added[member] then
      added[member] = true
      members[#members + 1] = member
    end
    moved = moved + 1
    if sized then grown = grown + lib_bytes().entry_bytes({name, payload}, bighash) end
  else
    skipped = skipped + 1
  end
end
if moved > 0 then
  index_add(KEYS[n + 2], KEYS[2], unpack(members))
  arm(KEYS[n + 1], KEYS[2])
end
if grown > 0 then lib_bytes().bytes_add(counters, KEYS[2], grown) end
return {moved, skipped, held}
