-- FINGERPRINT: compare a read's body digest with the last one recorded for
-- the version the read was served under; a change means a write bypassed
-- the proxy, so mint.
-- KEYS[1]  resource key
-- ARGV[1]  token the read was served under      ARGV[2]  body digest
-- ARGV[3]  fresh token        ARGV[4]  committed-version TTL, ms
-- Returns {token, minted_ms, exists, epoch}: the version after the check
-- (a new one if this call minted), or nil if the key moved on (other token,
-- pending, absent, other epoch). A minted version gets no digest: reads may
-- finish out of order, so the body that disagreed is not a baseline, and
-- the read that carried it must not get the new token (the caller sends
-- no ETag when the token changed).
local now, rid = now_ms(), run_id()
local key = KEYS[1]
local r = read_key(key, D)
if r[S] ~= 'c' or r[E] ~= rid or r[T] ~= ARGV[1] then return nil end
if r[D] and r[D] ~= ARGV[2] then
  r = commit(key, rid, ARGV[3], now, '1', ARGV[4])
  return {r[T], r[M], r[X], r[E]}
end
redis.call('HSET', key, 'd', ARGV[2])
return {r[T], r[M], r[X], r[E]}
