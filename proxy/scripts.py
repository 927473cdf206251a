"""The Lua scripts the store runs. Each touches the keys of one virtual shard only (one hash
tag, so one Redis Cluster slot), atomically; ``store`` owns the key schema they assume:

    S = the shard's key prefix, "{P:n}:"
    S e:<id>       entry hash: m (metadata), b (body), g (the generation of each of its tags,
                   "<gen> <tag>\\n" lines), p (soft purge time, ms, for display)
                   | v (vary marker: the varying field names) | h (hit-for-miss: the reason)
    S g:<tag>      tag generation "<last purge µs>:<last hard purge µs>"
    S t:<tag>      tag index: entry ids scored by their expiry (ms); for deleting, counting,
                   listing, never for deciding what may be served
    S M            shard marker, a hash: for each of 1024 buckets of tags (by the SHA-1 of
                   the tag), an upper bound of every purge time (µs) a missing generation
                   key of a tag in that bucket may have held; "*" the bound of buckets not
                   purged since the marker was made (by the first lookup), "#" the last purge
                   stamp. Buckets keep a write's purge from refusing unrelated fills: only
                   fills of tags in the purged tags' buckets that have no generation key yet
    S l:<id>       coalescing lock
    S c            the shard's channel: "f <id>" a fill finished; "i <tags>" / "s <tags>"
                   tags purged / soft-purged; "*" everything flushed

Eviction-safe by construction: an entry is served only when every one of its tags still has
the generation the entry recorded, or, where a generation key is gone, when the shard marker
proves no purge happened since. Losing any key (an entry, an index, a generation, the marker,
a lock) costs misses or extra fetches, never a stale or another user's answer.

Numbers above 2^31 are formatted with "%d": Lua's default conversion keeps 14 digits.
"""

# Reads the hash of an entry key and judges it against the tag generations, in the lookup's
# round trip; takes the fill lock when nothing usable is there (or, with ARGV[5], whatever
# is there: a waiter that looks again and becomes the leader if the holder is gone).
# KEYS: [1] entry key, [2] shard marker, [3] lock key
# ARGV: [1] shard prefix, [2] lock token ("" for none), [3] lock ttl ms, [4] marker ttl ms,
#       [5] "1": take the lock even when an entry is there
# Returns {kind, now µs, locked, ...}: kind "e" + meta, body, soft purge µs (0: none), p;
#   "v" + names; "h" + reason; "n" (nothing usable); "w" (not a hash); "x" (a hash that is
#   none of these: corrupt)
# allow-oom: a lookup answers even when Redis is out of memory; its only writes (a missing
# marker, a lock) are a few bytes.
# The bound a missing generation key of ``tag`` stands for (see "S M"), or nil when the
# marker is gone.
_BOUND = """
local function bound(mk, tag)
  local b = tostring(tonumber(string.sub(redis.sha1hex(tag), 1, 6), 16) % 1024)
  local v = redis.call('HMGET', mk, b, '*')
  return tonumber(v[1] or v[2])
end
"""

LOOKUP = "#!lua flags=allow-oom\n" + _BOUND + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('HSET', KEYS[2], '*', string.format('%d', now - 1))
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
local f = redis.pcall('HGETALL', KEYS[1])
if f['err'] then
  return {'w', now, 0}
end
local h = {}
for i = 1, #f, 2 do
  h[f[i]] = f[i + 1]
end
local kind, soft = 'n', 0
if h['v'] then
  return {'v', now, 0, h['v']}
elseif h['h'] then
  return {'h', now, 0, h['h']}
elseif h['m'] and h['b'] and h['g'] then
  kind = 'e'
  for gen, tag in string.gmatch(h['g'], '(%d+) ([^\\n]+)') do
    local g = tonumber(gen)
    local cur = redis.call('GET', ARGV[1] .. 'g:' .. tag)
    if cur then
      local last, hard = string.match(cur, '^(%d+):(%d+)$')
      if tonumber(hard) > g then
        kind = 'n'
        break
      end
      if tonumber(last) > g and (soft == 0 or tonumber(last) < soft) then
        soft = tonumber(last)
      end
    elseif bound(KEYS[2], tag) > g then
      kind = 'n'
      break
    end
  end
elseif next(h) ~= nil then
  return {'x', now, 0}
end
local locked = 0
if ARGV[2] ~= '' and (kind == 'n' or ARGV[5] == '1') and
    redis.call('SET', KEYS[3], ARGV[2], 'NX', 'PX', ARGV[3]) then
  locked = 1
end
if kind == 'e' then
  return {'e', now, locked, h['m'], h['b'], string.format('%d', soft), h['p'] or ''}
end
return {'n', now, locked}
"""

# Releases the fill lock when it is still ours and announces that the fill is over.
# KEYS[2] lock key; ARGV[2] lock token or "", [3] channel, [4] publish command, [5] primary id
_FINISH = """
local function finish(code)
  if ARGV[2] ~= '' and redis.call('GET', KEYS[2]) == ARGV[2] then
    redis.call('DEL', KEYS[2])
  end
  redis.call(ARGV[4], ARGV[3], 'f ' .. ARGV[5])
  return code
end
"""

# KEYS: [1] entry key, [2] lock key, [3] shard marker, [4] primary key (the vary marker's; the
#       entry key again when the response does not vary)
# ARGV: [1] shard prefix, [2] lock token or "", [3] channel, [4] publish command,
#       [5] primary id, [6] entry id, [7] meta, [8] body, [9] ttl ms, [10] lookup epoch µs,
#       [11] vary names or "", [12] marker's url tag or "", [13..] tags
# Returns 1 when stored, 0 when a tag was purged (or the marker lost) since the lookup.
# The shebang (no allow-oom) makes Redis refuse the whole script up front when memory is
# full (maxmemory with noeviction): the lock then expires by itself.
SAVE = "#!lua\n" + _FINISH + _BOUND + """
local p = ARGV[1]
if redis.call('EXISTS', KEYS[3]) == 0 then
  return finish(0)
end
local epoch = tonumber(ARGV[10])
local gens, have, lasts = {}, {}, {}
for i = 13, #ARGV do
  local cur = redis.call('GET', p .. 'g:' .. ARGV[i])
  local last
  if cur then
    last = tonumber(string.match(cur, '^(%d+)'))
  else
    last = bound(KEYS[3], ARGV[i])
  end
  if last >= epoch then
    return finish(0)
  end
  have[i] = cur
  lasts[i] = last
  gens[#gens + 1] = string.format('%d %s\\n', last, ARGV[i])
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[9])
local function index(tag, member)
  local ik = p .. 't:' .. tag
  redis.call('ZADD', ik, now + ttl, member)
  redis.call('ZREMRANGEBYSCORE', ik, '-inf', now)
  if redis.call('PTTL', ik) < ttl then
    redis.call('PEXPIRE', ik, ttl)
  end
end
local function unindex(key, member)
  local g = redis.call('HGET', key, 'g')
  if g then
    for _, tag in string.gmatch(g, '(%d+) ([^\\n]+)') do
      redis.call('ZREM', p .. 't:' .. tag, member)
    end
  end
end
for i = 13, #ARGV do
  local gk = p .. 'g:' .. ARGV[i]
  if not have[i] then
    redis.call('SET', gk, string.format('%d:%d', lasts[i], lasts[i]), 'PX', ttl)
  elseif redis.call('PTTL', gk) < ttl then
    redis.call('PEXPIRE', gk, ttl)
  end
  index(ARGV[i], ARGV[6])
end
if ARGV[11] ~= '' then
  if redis.call('HGET', KEYS[4], 'v') ~= ARGV[11] then
    redis.call('DEL', KEYS[4])
    redis.call('HSET', KEYS[4], 'v', ARGV[11])
  end
  if redis.call('PTTL', KEYS[4]) < ttl then
    redis.call('PEXPIRE', KEYS[4], ttl)
  end
  if ARGV[12] ~= '' then
    index(ARGV[12], ARGV[5])
  end
end
unindex(KEYS[1], ARGV[6])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'm', ARGV[7], 'b', ARGV[8], 'g', table.concat(gens))
redis.call('PEXPIRE', KEYS[1], ttl)
return finish(1)
"""

# A hit-for-miss marker (keeps a vary marker: other variants), then the lock is released.
# KEYS: [1] primary key, [2] lock key; ARGV: [1] reason, [2] lock token or "", [3] channel,
#       [4] publish command, [5] primary id, [6] ttl ms
HIT_FOR_MISS = "#!lua\n" + _FINISH + """
if redis.call('HEXISTS', KEYS[1], 'v') == 0 then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'h', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
end
return finish(1)
"""

# Releases the lock (a fill that stores nothing). Flagless: allowed when out of memory.
# KEYS: [1] unused (the lock key again), [2] lock key; ARGV: [1] unused, [2..5] as for
#       finish(): lock token, channel, publish command, primary id
UNLOCK = _FINISH + """
return finish(1)
"""

# Purges tags in one shard. The first call moves each existing tag generation (and the
# shard marker's buckets of the tags) to now, which alone makes every entry carrying one of
# the tags unusable, and announces the purge on the shard's channel; then the tag indexes are
# walked to delete the entries (or, soft, mark them), bounded to ``batch`` entries per call so
# that Redis is never blocked for long: the caller calls again with what is left.
# allow-oom: purges must work, and delete, when memory is full; overwriting a generation
# with a number of the same length does not grow it.
# KEYS: [1] shard marker
# ARGV: [1] shard prefix, [2] soft 0/1, [3] batch size, [4] offset into the first tag's
#       index (soft purges leave indexes in place, so they walk them), [5] marker ttl ms,
#       [6] channel, [7] publish command, [8] first call 0/1, [9..] tags
# Returns {entries affected, tags finished, offset to resume the first unfinished tag at}.
PURGE = """#!lua flags=allow-oom
local p = ARGV[1]
local soft = ARGV[2] == '1'
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[8] == '1' then
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local m = tonumber(redis.call('HGET', KEYS[1], '#') or '0')
  if now <= m then
    now = m + 1
  end
  local stamp = string.format('%d', now)
  if redis.call('EXISTS', KEYS[1]) == 0 then
    redis.call('HSET', KEYS[1], '*', stamp)  -- lost: any generation may have been purged
  end
  redis.call('HSET', KEYS[1], '#', stamp)
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  local tags = {}
  for i = 9, #ARGV do
    local b = tostring(tonumber(string.sub(redis.sha1hex(ARGV[i]), 1, 6), 16) % 1024)
    redis.call('HSET', KEYS[1], b, stamp)
    local gk = p .. 'g:' .. ARGV[i]
    local cur = redis.call('GET', gk)
    if cur then
      local hard = stamp
      if soft then
        hard = string.match(cur, ':(%d+)$')
      end
      redis.call('SET', gk, stamp .. ':' .. hard, 'KEEPTTL')
    end
    tags[#tags + 1] = ARGV[i]
  end
  redis.call(ARGV[7], ARGV[6], (soft and 's ' or 'i ') .. table.concat(tags, ' '))
end
local budget = tonumber(ARGV[3])
local offset = tonumber(ARGV[4])
local count, done = 0, 0
for i = 9, #ARGV do
  local ik = p .. 't:' .. ARGV[i]
  local members = redis.call('ZRANGE', ik, offset, offset + budget - 1)
  for _, m in ipairs(members) do
    local key = p .. 'e:' .. m
    if soft then
      if redis.call('HEXISTS', key, 'm') == 1 then
        redis.call('HSET', key, 'p', now_ms)
        count = count + 1
      end
    else
      local g = redis.call('HGET', key, 'g')
      if g then
        for _, tag in string.gmatch(g, '(%d+) ([^\\n]+)') do
          if tag ~= ARGV[i] then
            redis.call('ZREM', p .. 't:' .. tag, m)
          end
        end
        count = count + 1
      end
      redis.call('DEL', key)
    end
  end
  if #members == budget then
    -- the batch is spent; more may remain in this tag
    if soft then
      return {count, done, offset + #members}
    end
    redis.call('ZREM', ik, unpack(members))
    return {count, done, 0}
  end
  if not soft then
    redis.call('DEL', ik)
  end
  budget = budget - #members
  done = done + 1
  offset = 0
end
return {count, done, 0}
"""
