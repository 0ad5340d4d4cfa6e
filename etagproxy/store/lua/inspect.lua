-- INSPECT: everything about a resource key, read-only.
-- KEYS[1]  resource key
-- Returns {now_ms, run_id, pttl, field1, value1, ...}.
local reply = {now_ms(), run_id(), redis.call('PTTL', KEYS[1])}
for _, v in ipairs(redis.call('HGETALL', KEYS[1])) do reply[#reply + 1] = v end
return reply
