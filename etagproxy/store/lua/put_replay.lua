-- PUT_REPLAY: record a 2xx write response for safe retries (one script so
-- the record never exists without its TTL).
-- KEYS[1]  replay record key
-- ARGV[1]  TTL, ms    ARGV[2]  fingerprint    ARGV[3]  status
-- ARGV[4]  headers (JSON list of pairs)    ARGV[5]  body
-- Returns 1.
-- The four fields are all a record has: HSET replaces one in place (no DEL
-- first, see commit() in prelude.lua).
redis.call('HSET', KEYS[1], 'f', ARGV[2], 's', ARGV[3], 'h', ARGV[4], 'b', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
