--[[ read: deliver up to COUNT ready messages to one consumer, highest priority first.

KEYS[1..S]      the streams to read, in serving order: fanout streams first, then by
                priority level, then source order, e.g.
                ks:x:{bcast}:fanout ks:q:{a}:0 ks:q:{b}:0 ks:q:{a}:3 ...
                so stream i is the stream of the i-th fanout source for i <= F (F: the
                sources of kind 'f'), else of the ((i - F - 1) mod O + 1)-th of the O queue
                sources (kind 'q'), each with S - F = O x levels streams
KEYS[S+12q-11]  wake marker (zset) of source q, q = 1..Q; a source is a queue's own
                streams, or its group on one fanout stream (marker ks:x:{ex}:wake:<queue>)
KEYS[S+12q-10]  dead-letter stream of source q
KEYS[S+12q-9]   ready index (set) of source q, ks:q:{queue}:ready
KEYS[S+12q-8]   delayed set (zset) of source q, ks:q:{queue}:delayed
KEYS[S+12q-7]   delayed messages (hash) of source q, ks:q:{queue}:delayed:m
KEYS[S+12q-6]   big messages (hash) of source q, ks:q:{queue}:big
KEYS[S+12q-5]   counters (hash) of source q, ks:q:{queue}:counters: "expired" counts the
                messages set aside past their TTL; with x-max-length-bytes "waiting-bytes"
                loses the sizes of the messages the call delivered or set aside, and is
                set to 0 when it leaves nothing waiting (lua/lib/bytes.lua); with
                x-max-in-flight "in-flight-bound" is kept, an upper bound of the group's pending
                entries (lua/lib/inflight.lua); a fanout
                source has no index, no delayed keys, no big messages, no counters, no
                arguments, no rate key, no key store, no flag and no staging hash (the
                caller passes its marker again for each)
KEYS[S+12q-4]   arguments (hash) of source q, ks:q:{queue}:args: only x-rate-limit,
                x-rate-burst, x-max-in-flight, x-priority-aging, x-group-max-in-flight and
                x-max-length-bytes are read (one HMGET per source served)
KEYS[S+12q-3]   rate limiter state (string) of source q, ks:q:{queue}:rate: the next
                delivery's theoretical arrival time, unix ms, expiring once it is past;
                written only when the queue has x-rate-limit (lua/lib/rate.lua)
KEYS[S+12q-2]   key store (hash) of source q, ks:q:{queue}:unique: a delayed or staged
                message moved to its stream (or a due one staged) that holds an x-unique-key
                keeps it (the store then names where it is; lua/lib/unique.lua); looked at
                (TYPE) only when due or staged messages move or keyed acks ride along
                (ARGV[9+5Q+2A])
KEYS[S+12q-1]   in-flight flag (string) of source q, ks:q:{queue}:capped: raised when the
                queue's x-max-in-flight (or x-group-max-in-flight) left ready work without a
                marker; acks that ride
                along and free a slot lower it and set the marker (lua/lib/inflight.lua)
KEYS[S+12q]     staging hash of source q, ks:q:{queue}:fair: on a queue with x-fairness,
                messages wait there per group until a read moves them into their level's
                stream in rotation order, just before reading it (lua/lib/fair.lua); looked
                at only where the ready index names a level's staging (g:<stream key>); with
                x-group-max-in-flight each group's moves (f:<group>) and the FIFO of groups
                that ran dry (zh, zt, z:<n>) are kept there too (fair_gate)
ARGV[1]         consumer name (unique per channel)
ARGV[2]         COUNT: the most messages to deliver (the channel's free prefetch)
ARGV[3]         name of the holder consumer that parks requeued messages
ARGV[4]         delivery limit: a message about to be delivered more often than this goes to
                its queue's dead-letter stream instead (0: no limit)
ARGV[5]         S: number of streams;  ARGV[6]  Q: number of sources
ARGV[7]         BYTES: the byte budget of the call (>= 1): entries are copied in batches sized
                to fit it, and one that does not fit alone is still delivered, alone (see
                the top of lua/lib/serve.lua for the worst case)
ARGV[3+5q]      consumer group of source q (the queue's name)
ARGV[4+5q]      'q': a queue's own streams; 'f': a group on a fanout stream that other groups
                read too (entries are only acked there, never deleted; setting one aside
                trims the stream below what every group is done with)
ARGV[5+5q]      how to read source q: 'r' read it; 'p' read it, this consumer popped its
                marker (if COUNT runs out first, the marker is set again); 'm' read it only
                if its marker is set (else nothing is ready: the wake-up invariant); 'w' walk
                it: look at every stream, not only those its ready index names, and rebuild
                the index (a repair, now and then; if COUNT runs out first, the marker is
                set again, as for 'p': a read a wait carries walks sources whose marker the
                wait may have popped)
ARGV[6+5q]      ttl in ms of source q's marker and index (x-expires; 0: the ttl of its first
                stream)
ARGV[7+5q]      size hint of source q: the bytes the caller expects of its largest entry (0:
                unknown, the first batch is one entry); sizes the call's first batch of it
ARGV[8+5Q]      A: the number of acks that ride along (0: none), then A pairs: stream index
                i (a queue's own stream, never a fanout one; -i: trusted, see ack.lua),
                entry id; they are acked before anything is read, as ack.lua does for
                consumer ARGV[1] (one round trip, one call): only those it still owns
ARGV[9+5Q+2A]   optional: U >= 1, the number of those acks whose messages hold an
                x-unique-key, then U pairs: the ack's number 1..A, its key. Each key is
                released (or kept x-unique-ttl ms: throttle) when its entry is deleted
                here, in the source's key store KEYS[S+12q-2], as ack.lua's mode "u" does
Reply: {status, problems, aside, dues, unsettled, then per delivered message, in delivery
       order: stream index i, entry id, delivery count, payload}; the payload of a big
       message is {token}: the caller fetches its body from KEYS[S+12q-6] (HGET)
       status    one character per source: '1' may hold more ready messages, '0' nothing
                 ready (or nothing the queue's rate limit or x-max-in-flight lets out
                 now), '-' not reached
                 (COUNT ran out first), 'e' it met a problem
       problems  {q, error, ...}: errors on source q's keys (another program's key at one of
                 our names); the call goes on with the other sources
       aside     {q, i, entry id, reason, ...}: entries moved to the dead-letter stream
                 (reason "expired": past its TTL deadline, never delivered)
       dues      {q, ms, ...} for each queue source opened: ms until its next delayed message
                 is due (0: due now, more than this call moved), -1: it holds none; for a
                 queue the rate limit held back, the earlier of that and its next slot
       unsettled {q, n, ...}: n acks that rode along for source q were left alone, the
                 consumer no longer owns those entries (its lease ran out, another took them)
Errors: "read: expected ..." for another layout (an ack pair of a fanout stream too: "read:
        an ack of fanout stream ..."); none from a source's keys (see problems; a key store of
        another type leaves the keys of riding acks held, the acks made); Redis's own
        otherwise.
Minimum Redis: 6.2. Cost: sources are opened in serving order until COUNT or BYTES is used
up (an EXISTS of the marker in mode 'm', SMEMBERS of the index), then commands only for the
streams the index names: O(COUNT + entries set aside), one XREADGROUP per stream while the
caller's size hint holds; a walk adds an XLEN per stream, moving due delayed messages at
most PROMOTE (500) and BYTES of them (an HSTRLEN each, a TYPE of the key store per call
that moves any; a store that exists adds an HMGET, and an HGET per moved message with a
unique key, an HSET and an HDEL; on a queue whose staging hash exists an EXISTS, and an
HGET per due message, staged in its group if it has one); a big message adds an HSTRLEN; a
staged message moved (x-fairness) an XADD and its share of an HMGET, each group served a
few hash commands, at most what the call may still deliver per level, whatever the number
of groups waiting;
entries set aside (expired ones too) at most COUNT + 100 per call, the rest next call;
acks that ride along add one XPENDING per stream (ownership, see ack.lua) unless all of the
stream's are trusted; a source whose riding acks freed entries adds a TYPE of its flag;
keyed acks a TYPE of the key store per stream, and an HMGET, an HDEL and an HSET and a
TIME (for throttled keys) per stream and 1,000 keys. A queue with x-max-length-bytes adds
an HINCRBY (or an HSET when dry; an HSTRLEN per entry of a big message it sets aside); with
x-rate-limit a TIME, a GET and a SET; with x-max-in-flight an HGET of its bound, an HSET
when the bound changed and, only where the bound does not leave room for COUNT (or is not
kept), an XPENDING summary per stream (O(consumers of its group)), and a TYPE and SET of
its flag when the limit stops the read; one with x-priority-aging, once per call, for each
lower level than the first it serves that its index names: an XPENDING of one record when
held entries may be there, else (or none held) an XINFO GROUPS and an XRANGE of at most one
entry (copied only when it waited a period or more), and TIME; one without any pays the
HMGET of its arguments. Never blocks.
Phases: lua/lib/serve.lua, the rarer ones lua/lib/serve_rare.lua. See docs/design.rst
(Wake-ups, The ready index, Leases, Delivery counts and dead letters, Delayed delivery,
Reads bounded by bytes, Big messages, Message TTL, Global rate limit, Global concurrency,
Unique keys, Priority aging, Fair share).
]]
--@include common
--@include delay
--@include bytes
--@include expiry
--@include rate
--@include inflight
--@include unique
--@include aging
--@include fair
--@include serve
--@include serve_rare

local S, Q = tonumber(ARGV[5]), tonumber(ARGV[6])
local A = S and Q and tonumber(ARGV[8 + 5 * Q]) or 0
local U = S and Q and #ARGV > 8 + 5 * Q + 2 * A and tonumber(ARGV[9 + 5 * Q + 2 * A]) or 0
local fits = S and Q and #KEYS == S + 12 * Q and A >= 0 and A % 1 == 0 and U >= 0 and U % 1 == 0
             and #ARGV == 8 + 5 * Q + 2 * A + (U > 0 and 1 + 2 * U or 0)
local F = 0  -- fanout sources: one stream each; the O queue sources have one per level
if fits then
  for q = 1, Q do
    if ARGV[4 + 5 * q] == 'f' then F = F + 1 end
  end
  local O = Q - F
  fits = S >= F and ((O == 0 and S == F) or (O > 0 and S > F and (S - F) % O == 0))
end
if not fits then
  return check_args('read', false, false, tostring(S) .. ' streams, ' .. tostring(Q) ..
                    ' sources and ' .. tostring(A) .. ' acks (S + 12Q keys, 8 + 5Q + 2A args ' ..
                    'and 1 + 2U more with U keyed acks, S = fanout sources + queue sources ' ..
                    'x levels)')
end
local ctx = new_context(ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]),
                        math.max(tonumber(ARGV[7]) or 1, 1))
local sources, of = load_sources(S, Q, F)
local refused = ride_acks(ctx, of, 9 + 5 * Q, A, U)  -- before any read, as ack.lua would
if refused then return redis.error_reply(refused) end
for i = 1, S do
  if ctx.left <= 0 then break end
  local src = of[i]
  if not src.failed and open_source(ctx, src) then serve_stream(ctx, src, i) end
end
return finish(ctx, sources)
