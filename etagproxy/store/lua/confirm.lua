-- CONFIRM: a 2xx read showed that the resource exists; mark its version so
-- (If-Match needs an existing representation, RFC 9110 §13.1.1).
-- KEYS[1]  resource key
-- ARGV[1]  token the read was served under
-- Returns 1 if the version was marked, else 0.
local now, rid = now_ms(), run_id()
local key = KEYS[1]
local r = read_key(key, L)
if not current(r, rid) or r[T] ~= ARGV[1] or r[X] == '1' then return 0 end
if r[S] == 'p' and tonumber(r[L]) <= now then return 0 end
redis.call('HSET', key, 'x', '1')
return 1
