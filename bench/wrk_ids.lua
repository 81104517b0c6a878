-- wrk script of the serving benchmark: spreads GET requests over the ids of a file, one id per line.
--   wrk -t1 -c8 -d10s --latency -s bench/wrk_ids.lua http://127.0.0.1:8000 -- IDS_FILE PATH_TEMPLATE OFFSET
-- PATH_TEMPLATE holds "{id}" (e.g. /v1/users/{id}/recommendations?k=20); ids are used as written (URL-safe).
-- Each wrk thread walks the ids in file order from its own offset, wrapping around. done() prints one line
-- "WRK_JSON {...}" with the request count, errors and latency percentiles in microseconds.

local ids = {}
local prefix, suffix = "", ""
local position = 0
local threads_started = 0

function setup(thread)
  thread:set("thread_index", threads_started)
  threads_started = threads_started + 1
end

function init(args)
  for line in io.lines(args[1]) do
    if #line > 0 then ids[#ids + 1] = line end
  end
  local at = string.find(args[2], "{id}", 1, true)
  prefix, suffix = string.sub(args[2], 1, at - 1), string.sub(args[2], at + 4)
  position = (tonumber(args[3] or "0") + (thread_index or 0) * 7919) % #ids
end

function request()
  position = position % #ids + 1
  return wrk.format("GET", prefix .. ids[position] .. suffix)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"min": %d, "mean": %.1f, "p50": %d, "p90": %d, "p99": %d, "p999": %d, "max": %d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max))
end
