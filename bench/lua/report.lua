-- Appended to every load script: after the run, print its numbers as one
-- JSON line (wrk's own text output rounds latencies to two digits).
-- Latencies are in microseconds; errors.status counts answers >= 400.
local function pct(latency, summary, p)
  if summary.requests > 0 then return latency:percentile(p) end
  return 0
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"p50_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,"mean_us":%.1f,"max_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    pct(latency, summary, 50), pct(latency, summary, 90), pct(latency, summary, 99),
    latency.mean, latency.max))
end
