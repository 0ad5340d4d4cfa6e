-- OBSERVE: the committed version of a resource (minted if it has none),
-- whether a write is in flight, and whether a reader was recorded.
-- KEYS[1]  resource key
-- KEYS[2]  reader record key (optional)
-- ARGV[1]  fresh token, used only if this call mints
-- ARGV[2]  committed-version TTL, ms
-- Returns {token, minted_ms, exists, epoch, pending (0|1), cause, reader_seen (0|1)};
-- cause is '' or the base.Cause value of the mint.
local now, rid = now_ms(), run_id()
local r = read_key(KEYS[1], L)
local cause = ''
if not r[S] then
  r = commit(KEYS[1], rid, ARGV[1], now, '0', ARGV[2])
  cause = 'first_sight'
elseif r[S] == 'p' then
  local cur = current(r, rid)
  if tonumber(r[L]) <= now then
    -- DESIGN §2.5: the write's outcome is unknown.
    r = commit(KEYS[1], rid, ARGV[1], now, cur and cur[X] or '0', ARGV[2])
    cause = 'lease_expired'
  elseif not cur then
    -- A write in flight on a key with no version: give readers one to hold;
    -- a rejected write restores it.
    redis.call('HSET', KEYS[1], 'e', rid, 't', ARGV[1], 'm', now, 'x', '0')
    redis.call('HDEL', KEYS[1], 'd')
    cause = r[T] and 'epoch' or 'first_sight'
    r[E], r[T], r[M], r[X] = rid, ARGV[1], now, '0'
  end
elseif r[E] ~= rid then
  r = commit(KEYS[1], rid, ARGV[1], now, '0', ARGV[2])
  cause = 'epoch'
end
local seen = 0
if KEYS[2] then seen = redis.call('EXISTS', KEYS[2]) end
return {r[T], r[M], r[X], r[E], r[S] == 'p' and 1 or 0, cause, seen}
