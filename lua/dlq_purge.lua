--[[ dlq_purge: delete a queue's dead letters up to an id, and the big bodies they refer to.

KEYS[1]   the queue's dead-letter stream, ks:q:{queue}:dlq
KEYS[2]   the queue's big messages (hash), ks:q:{queue}:big
ARGV[1]   the last id to delete ("ms-seq", inclusive): letters filed later stay
ARGV[2]   batch: the most letters to delete in this call
Reply:    {deleted, more}: letters deleted, and 1 when letters up to ARGV[1] may be left
          (call again until more is 0)
Errors:   "dlq_purge: expected ..." for another layout or a bad id; WRONGTYPE (checked
          before any write)
Minimum Redis: 6.2. Cost: without big messages in the queue (no big hash), no letter is
read while whole stream nodes can go (XTRIM MINID ~ with LIMIT batch). Otherwise (the rest
of the last node; or with big messages, whose tokens f:r are needed) letters are read in
XRANGE pages of at most 100, until batch or about 4 MiB copied, and deleted with XDEL. Why
a script: a letter and its body go together, never one without the other. See
docs/design.rst (Big messages).
]]
--@include common
local ms, seq = string.match(ARGV[1] or '', '^(%d+)-(%d+)$')
local batch = tonumber(ARGV[2])
local bad = check_args('dlq_purge', #KEYS == 2, #ARGV == 2 and ms ~= nil and batch ~= nil
                       and batch >= 1, 'KEYS: dead-letter stream, big messages; ARGV: last ' ..
                       'id (ms-seq), batch >= 1')
if bad then return bad end
local dlq, big, through = KEYS[1], KEYS[2], ARGV[1]
bad = wrong_type(dlq, 'stream') or wrong_type(big, 'hash')
if bad then return redis.error_reply(bad) end
if redis.call('EXISTS', big) == 0 then
  -- nothing to free: trim whole nodes below the id after ARGV[1], without reading them
  local minid = ms .. '-' .. string.format('%d', tonumber(seq) + 1)
  local trimmed = redis.call('XTRIM', dlq, 'MINID', '~', minid, 'LIMIT', batch)
  if trimmed > 0 then return {trimmed, 1} end
end
-- letters one by one (what is left of a node, or with big messages), read in pages
local COPY_BYTES = 4 * 1024 * 1024
local ids, free, copied, start = {}, {}, 0, '-'
local more = 0
while #ids < batch do
  if copied >= COPY_BYTES then
    more = 1
    break
  end
  local want = math.min(100, batch - #ids)
  local page = redis.call('XRANGE', dlq, start, through, 'COUNT', want)
  for _, e in ipairs(page) do
    ids[#ids + 1] = e[1]
    for _, v in ipairs(e[2]) do copied = copied + #v end
    local token = field(e[2], 'f:r')
    if token then free[#free + 1] = token end
  end
  if #page < want then break end
  start = '(' .. page[#page][1]
  if #ids >= batch then more = 1 end
end
if #ids > 0 then redis.call('XDEL', dlq, unpack(ids)) end
if #free > 0 then redis.call('HDEL', big, unpack(free)) end
return {#ids, more}
