-- Requests built once per thread, then sent in rotation: the per-request
-- cost inside wrk is one table lookup, the same for every target.
--
-- BENCH (defined before this file):
--   method        "GET" or "PUT"
--   paths         list of paths; "{tid}" becomes the thread number, so
--                 threads write disjoint keys
--   tags          optional list, tags[k] is sent in header tag_header with paths[k]
--   tag_header    "If-None-Match", ...
--   body          request body or nil

local threads = 0
setup = function(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

local reqs = {}
local n, i = 0, 0

init = function(args)
  local id = tostring(tid or 1)
  for k, p in ipairs(BENCH.paths) do
    local h = {}
    if BENCH.body then h["Content-Type"] = "application/json" end
    if BENCH.tags then h[BENCH.tag_header] = BENCH.tags[k] end
    reqs[k] = wrk.format(BENCH.method, (p:gsub("{tid}", id)), h, BENCH.body)
  end
  n = #reqs
  -- Threads start at different offsets so they do not walk the keys in step.
  i = ((tid or 1) - 1) * 7 % n
end

request = function()
  i = i + 1
  if i > n then i = 1 end
  return reqs[i]
end
