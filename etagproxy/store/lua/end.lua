-- END: commit the outcome of the write holding the lease (DESIGN §2.4).
-- KEYS[1]  resource key
-- ARGV[1]  owner
-- ARGV[2]  outcome: 'success' | 'rejected' | 'unknown'
-- ARGV[3]  exists after the write: '1' | '0'
-- ARGV[4]  fresh token        ARGV[5]  committed-version TTL, ms
-- Returns {} when the lease was lost, else {token, minted_ms, exists, epoch}.
local now, rid = now_ms(), run_id()
local key, outcome = KEYS[1], ARGV[2]
local r = read_key(key, I)
if r[S] ~= 'p' or r[O] ~= ARGV[1] or tonumber(r[L]) <= now then
  -- Someone may already have minted past us: nothing here is ours.
  return {}
end
local cur = current(r, rid)
if outcome == 'rejected' and cur and r[I] ~= '1' then
  redis.call('HSET', key, 's', 'c')
  redis.call('HDEL', key, 'o', 'n', 'l', 'i')
  redis.call('PEXPIRE', key, ARGV[5])
else
  local exists = ARGV[3]
  if outcome == 'rejected' then exists = cur and cur[X] or '0' end
  r = commit(key, rid, ARGV[4], now, exists, ARGV[5])
end
return {r[T], r[M], r[X], r[E]}
