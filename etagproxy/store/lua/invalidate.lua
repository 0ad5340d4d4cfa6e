-- INVALIDATE: mint a new token for one resource; a pending write is marked
-- so that its END mints whatever the outcome.
-- KEYS[1]  resource key
-- ARGV[1]  fresh token        ARGV[2]  committed-version TTL, ms
-- Returns 1 if the key was re-minted or marked, 0 if it had no version.
local now, rid = now_ms(), run_id()
local key = KEYS[1]
local r = read_key(key, L)
if not r[S] then return 0 end
local cur = current(r, rid)
if r[S] == 'p' then
  if tonumber(r[L]) > now then
    redis.call('HSET', key, 'i', '1')
    return 1
  end
elseif not cur then
  return 0
end
commit(key, rid, ARGV[1], now, cur and cur[X] or '0', ARGV[2])
return 1
