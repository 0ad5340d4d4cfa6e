-- BEGIN: judge a write's preconditions against the committed version and
-- take the key's write lease (DESIGN §2.2). Mirrors base.evaluate_write.
-- KEYS[1]  resource key
-- ARGV[1]  owner            ARGV[2]  lease, ms
-- ARGV[3]  fresh token, used only if an expired lease is replaced
-- ARGV[4]  committed-version TTL, ms
-- ARGV[5]  call id: unique per begin() call, the same when a client retries
-- ARGV[6]  If-Match: '' absent | '*' any | 'L' the token list below
-- ARGV[7]  If-Unmodified-Since, seconds, or ''
-- ARGV[8]  If-None-Match: '' | '*' | 'L'
-- ARGV[9]  n, the number of If-Match tokens
-- ARGV[10] the epoch (run_id) the caller last saw, or ''
-- ARGV[11] an epoch the caller saw replace an older one, or ''
-- ARGV[12 .. 11+n]  If-Match tokens; ARGV[12+n ..]  If-None-Match tokens
-- then the epoch pair (prelude.lua)
-- Returns {status, busy_ms, token, minted_ms, exists, epoch, run_id}: status
-- 'ok', 'failed' or 'busy'; busy_ms is what is left of the other write's
-- lease (or of the restart fence); the version is the one judged ('' fields
-- when the key had none); run_id is the server's current epoch.
local rid, uptime
local function reply(status, busy_ms, cur)
  if cur then return {status, busy_ms, cur[T], cur[M], cur[X], cur[E], rid} end
  return {status, busy_ms, '', '', '', '', rid}
end

local now = now_ms()
rid, uptime = server_epoch(now)
local key, owner = KEYS[1], ARGV[1]
local r = read_key(key, L)
if r[S] == 'p' and r[O] == owner and r[N] == ARGV[5] then
  -- The lease is already ours: this call, retried after a lost reply.
  return reply('ok', 0, current(r, rid))
end
-- Fence (DESIGN §2, Redis epoch): a server restarted without its data, or
-- from an older snapshot, has forgotten the leases it held, and a write
-- begun before the restart may still be in flight. A caller that saw the
-- epoch change begins no write until one lease has passed since the start.
-- (A caller whose first contact is the new epoch cannot tell a restart from
-- a fresh deployment, and is not fenced: no write of its own can be old.)
-- A precondition that fails now fails whatever the old write does, so it is
-- still answered at once (below); only a write that would go ahead waits.
local restarted = (ARGV[10] ~= '' and ARGV[10] ~= rid) or ARGV[11] == rid
local fence_ms = 0
if restarted and uptime < tonumber(ARGV[2]) then fence_ms = tonumber(ARGV[2]) - uptime end
if r[S] == 'p' then
  local left = tonumber(r[L]) - now
  if left > 0 then return reply('busy', left, current(r, rid)) end
  -- DESIGN §2.5: the expired write's outcome is unknown.
  local cur = current(r, rid)
  r = commit(key, rid, ARGV[3], now, cur and cur[X] or '0', ARGV[4])
end
local cur = current(r, rid)

local im, inm = ARGV[6], ARGV[8]
local ius = tonumber(ARGV[7])
local n = tonumber(ARGV[9])
-- Whether ARGV[first .. last] names `token` (no table of the tokens: lists
-- are short, and building one cost more than the scan).
local function listed(first, last, token)
  for j = first, last do
    if ARGV[j] == token then return true end
  end
  return false
end

-- RFC 9110 §13.2.2: If-Match, else If-Unmodified-Since; then If-None-Match.
local exists = cur ~= nil and cur[X] == '1'
local ok = true
if im ~= '' then
  if not exists or (im == 'L' and not listed(12, 11 + n, cur[T])) then ok = false end
elseif ius and exists then
  if math.floor(tonumber(cur[M]) / 1000) > ius then ok = false end
end
if ok and inm ~= '' and exists then
  if inm == '*' or listed(12 + n, ARGC, cur[T]) then ok = false end
end
if not ok then return reply('failed', 0, cur) end
if fence_ms > 0 then return reply('busy', fence_ms, cur) end

redis.call('HSET', key, 's', 'p', 'o', owner, 'n', ARGV[5], 'l', now + tonumber(ARGV[2]))
-- No committed version to restore: drop a foreign epoch's fields (in place,
-- see commit()).
if not cur then redis.call('HDEL', key, 'e', 't', 'm', 'x', 'd', 'i') end
redis.call('PERSIST', key)
return reply('ok', 0, cur)
