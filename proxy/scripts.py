"""The Lua scripts the store runs: each one touches the keys of a single slot, atomically.
Their KEYS and ARGV are documented above each; ``store`` owns the key schema they assume."""

# Removes an entry from every index its metadata names (and from ~all), so that indexes stay
# exact when an entry is replaced or purged. ``prefix`` is the key prefix ("{P}:").
UNINDEX = """
local function unindex(prefix, member)
  local meta = redis.call('HGET', member, 'm')
  if meta then
    local ok, doc = pcall(cjson.decode, meta)
    if ok and type(doc) == 'table' and type(doc['t']) == 'table' then
      for _, tag in ipairs(doc['t']) do
        redis.call('ZREM', prefix .. 't:' .. tag, member)
      end
    end
    redis.call('ZREM', prefix .. 't:~all', member)
  end
end
"""

# KEYS: [1] entry key, [2] primary key (vary marker; the entry key when the response does
#       not vary), [3 .. 2+n] tag index keys, [3+n .. 2+2n] tombstone keys,
#       [3+2n ..] index keys of the vary marker (its URL tag)
# ARGV: [1] meta, [2] body, [3] ttl ms, [4] fill epoch µs, [5] n tags, [6] vary names or "",
#       [7] key prefix
# The shebang (Redis >= 7) makes Redis refuse the whole script up front when memory is full
# (maxmemory with noeviction); a flagless script would be let through once its first write
# (a DEL, allowed when out of memory) had run, and grow Redis past its limit.
SAVE = "#!lua\n" + UNINDEX + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = tonumber(ARGV[5])
-- Epochs, tombstones and the boot marker are in microseconds: a read right after a write
-- (same millisecond) must still be able to store what it fetched.
local epoch = tonumber(ARGV[4])
-- A fill that looked up before this Redis (re)started may carry data older than a write
-- acknowledged meanwhile (the restart lost that write's tombstones): refuse it. The boot
-- marker is set by the first lookup that finds it missing, to that lookup's time.
local boot = redis.call('GET', ARGV[7] .. 'boot')
if not boot or epoch < tonumber(boot) then
  return 0
end
for i = 3 + n, 2 + 2 * n do
  local stone = redis.call('GET', KEYS[i])
  if stone and tonumber(stone) >= epoch then
    return 0
  end
end
local ttl = tonumber(ARGV[3])
local expire_at = now + ttl
local function index(member, from, to)
  for i = from, to do
    redis.call('ZADD', KEYS[i], expire_at, member)
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    if redis.call('PTTL', KEYS[i]) < ttl then
      redis.call('PEXPIRE', KEYS[i], ttl)
    end
  end
end
if ARGV[6] ~= '' then
  local primary = KEYS[2]
  if redis.call('HGET', primary, 'v') ~= ARGV[6] then
    unindex(ARGV[7], primary)
    redis.call('DEL', primary)
    redis.call('HSET', primary, 'v', ARGV[6])
  end
  if redis.call('PTTL', primary) < ttl then
    redis.call('PEXPIRE', primary, ttl)
  end
  index(primary, 3 + 2 * n, #KEYS)
end
unindex(ARGV[7], KEYS[1])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'm', ARGV[1], 'b', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl)
index(KEYS[1], 3, 2 + n)
return 1
"""

# KEYS: [1] boot marker; ARGV: [1] lookup epoch µs, [2] ttl ms. Keeps the earliest epoch of
# the lookups that found the marker missing: all of them happened after Redis (re)started, so
# the earliest still bounds what may be stored, and two instances racing to set it cannot
# make one another's legitimate fills look older than the marker.
BOOT = """#!lua
local b = redis.call('GET', KEYS[1])
if not b or tonumber(ARGV[1]) < tonumber(b) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
"""

# KEYS: [1] primary key; ARGV: [1] reason, [2] ttl ms. Keeps a vary marker (other variants).
HIT_FOR_MISS = """#!lua
if redis.call('HEXISTS', KEYS[1], 'v') == 1 then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'h', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# Purges tags in one call, bounded to ``batch`` entries per call so that Redis is never blocked
# for long; the caller calls again with what is left.
# KEYS: pairs (tag index, tombstone) per tag; the tombstone is the index again when none is
#       wanted (admin purges of the entry set itself)
# ARGV: [1] soft (0/1), [2] tombstone ttl ms, [3] batch size, [4] offset into the first tag
#       (soft purges leave the index in place, so they walk it), [5] key prefix
# Returns {entries affected, tags finished, offset to resume the first unfinished tag at}.
PURGE_TAGS = UNINDEX + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local soft = ARGV[1] == '1'
local budget = tonumber(ARGV[3])
local offset = tonumber(ARGV[4])
local count = 0
local done = 0
for i = 1, #KEYS, 2 do
  local index, stone = KEYS[i], KEYS[i + 1]
  if stone ~= index and offset == 0 then
    -- pcall: a Redis out of memory refuses the tombstone, but still lets the purge delete
    -- (and refuses the racing fill's write as well).
    redis.pcall('SET', stone, now_us, 'PX', ARGV[2])
  end
  local members = redis.call('ZRANGE', index, offset, offset + budget - 1)
  if soft then
    for _, m in ipairs(members) do
      if redis.call('HEXISTS', m, 'm') == 1 then
        local marked = redis.pcall('HSET', m, 'p', now)
        if type(marked) == 'table' and marked.err then
          -- out of memory: delete rather than leave it fresh (its index records stay until
          -- they expire, so that this walk's offsets stay right)
          redis.call('DEL', m)
        end
        count = count + 1
      end
    end
  else
    for _, m in ipairs(members) do
      unindex(ARGV[5], m)
      count = count + redis.call('DEL', m)
    end
    if #members > 0 then
      redis.call('ZREM', index, unpack(members))
    end
  end
  if #members == budget then
    -- the batch is spent; more may remain in this tag
    if soft then
      return {count, done, offset + #members}
    end
    return {count, done, 0}
  end
  if not soft then
    redis.call('DEL', index)
  end
  budget = budget - #members
  done = done + 1
  offset = 0
end
return {count, done, 0}
"""

# Releases the coalescing lock only if we still hold it (it may have expired and been taken
# by another), and tells waiting processes that the fill is done.
# KEYS: [1] lock key; ARGV: [1] our token, [2] channel, [3] message (the primary key)
UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"""
