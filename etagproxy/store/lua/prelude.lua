-- Prepended to every script but put_replay. Every call of one ends its ARGV
-- with the epoch pair below. All keys of one call share one hash tag, so a
-- call touches one cluster slot.
--
-- Resource key: a hash (small hashes are listpack-encoded: about the memory
-- of one string, readable with HGETALL, and fields change one by one).
--   s  'c' committed | 'p' pending
--   e  epoch (server run_id) the committed version was minted in
--   t  token    m  minted, ms since the epoch    x  exists '1' | '0'
--   d  body digest seen by the last fingerprint read (committed only)
--   o  owner of the pending write    l  its deadline, ms
--   n  id of the BEGIN call that took the lease (a retried call is let in)
--   i  '1' when invalidated while pending
-- Under a pending write, e/t/m/x keep the committed version that a rejected
-- write restores (absent when the key had none).

-- Server time, so that every proxy agrees on deadlines and mint times
-- whatever its own clock says.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The epoch: run_id changes with every server process, so a value restored
-- from a snapshot or left by a failed-over master is recognised as foreign.
-- Scripts cannot keep state between calls. A caller whose connection read
-- `INFO server` when it opened passes the run_id and the process's start
-- (ms, server clock) as the last two ARGV: a server process cannot change
-- under a TCP connection (a restart or a failover ends it), so they are the
-- answering process's own. A caller that has none passes '' and '', and the
-- script reads INFO itself: about 7 us of server time per call, which was
-- half of what BEGIN and END cost the server.
local ARGC = #ARGV - 2
local EPOCH, STARTED = ARGV[ARGC + 1], ARGV[ARGC + 2]

local function run_id()
  if EPOCH ~= '' then return EPOCH end
  return string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
end

-- run_id and how long this server process has been up, ms.
local function server_epoch(now)
  if EPOCH ~= '' then return EPOCH, now - tonumber(STARTED) end
  local info = redis.call('INFO', 'server')
  return string.match(info, 'run_id:(%x+)'), tonumber(string.match(info, 'uptime_in_seconds:(%d+)')) * 1000
end

-- The key's fields as HMGET returns them (false where absent), indexed by
-- the constants below: an array rather than a table of names, which cost
-- redis-server about 5,000 instructions per call to build.
local S, E, T, M, X, O, N, L, I, D = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
-- `upto` is the last field the caller reads: HMGET looks each field up
-- along the whole hash, an absent one (i, d) at the most cost.
local function read_key(key, upto)
  if upto == L then return redis.call('HMGET', key, 's', 'e', 't', 'm', 'x', 'o', 'n', 'l') end
  if upto == I then return redis.call('HMGET', key, 's', 'e', 't', 'm', 'x', 'o', 'n', 'l', 'i') end
  return redis.call('HMGET', key, 's', 'e', 't', 'm', 'x', 'o', 'n', 'l', 'i', 'd')
end

-- The committed version held by `r` if it belongs to this epoch, else nil.
local function current(r, rid)
  if r[T] and r[E] == rid then return r end
  return nil
end

-- Replace whatever `key` holds by a new committed version. In place, the
-- key never deleted first: in a cluster slot being migrated away, a key
-- deleted here is gone from this node, and the script's next command on it
-- is refused ("non local key") with the deletion already done.
local function commit(key, rid, token, now, exists, ttl_ms)
  redis.call('HSET', key, 's', 'c', 'e', rid, 't', token, 'm', now, 'x', exists)
  redis.call('HDEL', key, 'd', 'o', 'n', 'l', 'i')
  redis.call('PEXPIRE', key, ttl_ms)
  return {'c', rid, token, now, exists}
end
