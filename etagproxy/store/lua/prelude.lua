-- Prepended to every script. All keys of one call share one hash tag, so a
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
-- Scripts cannot keep state between calls, so it is read every time:
-- about 4 us of server time (INFO 3.3, the match 0.9), a third of what a
-- script costs the server, against ~100 us per call in the client.
local function run_id()
  return string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
end

-- run_id and how long this server process has been up, ms (one INFO call).
local function server_epoch()
  local info = redis.call('INFO', 'server')
  return string.match(info, 'run_id:(%x+)'), tonumber(string.match(info, 'uptime_in_seconds:(%d+)')) * 1000
end

local function read_key(key)
  local v = redis.call('HMGET', key, 's', 'e', 't', 'm', 'x', 'd', 'o', 'n', 'l', 'i')
  return {s = v[1], e = v[2], t = v[3], m = v[4], x = v[5], d = v[6], o = v[7], n = v[8], l = v[9], i = v[10]}
end

-- The committed version held by `r` if it belongs to this epoch, else nil.
local function current(r, rid)
  if r.t and r.e == rid then return r end
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
  return {s = 'c', e = rid, t = token, m = now, x = exists}
end
