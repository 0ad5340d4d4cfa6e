-- PUT with the current If-Match, over and over: each PUT's response carries
-- the resource's new ETag, which the next PUT to that resource sends.
--
-- Every thread owns BENCH.keys resources ("{tid}" in BENCH.path), at least
-- as many as its connections, and a resource is only ever in one request at
-- a time, so no PUT races another one on the same key and none gets 412.
-- A resource whose tag is unknown (first use, or an answer without ETag) is
-- fetched with a GET first; those GETs are a few per thread and are counted
-- in the totals like the PUTs.
--
-- wrk gives `response` no connection identity, so the origin names the path
-- it served in the X-Item response header.
--
-- BENCH: path, keys, body, tag_header ("If-Match"; baselines use a header
-- nginx ignores, because its not-modified filter answers 412 to If-Match on
-- a response that has no ETag of its own).

local threads = 0
setup = function(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

local ready = {}   -- queue of paths whose current tag is known
local first, last = 1, 0
local fresh = {}   -- paths that need a GET
local tags = {}
local all = {}

init = function(args)
  local id = tostring(tid or 1)
  for k = 1, BENCH.keys do
    local p = (BENCH.path:gsub("{tid}", id):gsub("{k}", tostring(k)))
    fresh[#fresh + 1] = p
    all[#all + 1] = p
  end
end

request = function()
  if first <= last then
    local p = ready[first]
    ready[first] = nil
    first = first + 1
    return wrk.format("PUT", p, {
      ["Content-Type"] = "application/json",
      [BENCH.tag_header] = tags[p],
    }, BENCH.body)
  end
  local p = table.remove(fresh) or all[math.random(#all)]
  return wrk.format("GET", p)
end

local function header(headers, want)
  local v = headers[want]
  if v then return v end
  want = want:lower()
  for name, value in pairs(headers) do
    if name:lower() == want then return value end
  end
  return nil
end

response = function(status, headers, body)
  local p = header(headers, "X-Item")
  if not p then return end
  local t = header(headers, "ETag")
  if t and status < 300 then
    tags[p] = t
    last = last + 1
    ready[last] = p
  else
    fresh[#fresh + 1] = p
  end
end
