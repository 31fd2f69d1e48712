-- wrk script of `make bench`: rotates bearer tokens (one request per token in turn, so concurrent
-- requests carry different tokens) and prints one JSON line at the end.
--   wrk ... -s bench/wrk.lua URL -- TOKENS_FILE [bearer|webhook] [TOPIC_ID]
--   bearer:  GET URL with `Authorization: Bearer <token>`
--   webhook: POST URL with the webhook body {"jwt":"<token>","topic":"<TOPIC_ID>"} (ceiling runs)
local reqs = {}
local idx = 0

function init(args)
   local mode = args[2] or "bearer"
   local topic = args[3] or "00000000000000000000000000000000"
   local n = 0
   for line in io.lines(args[1]) do
      if #line > 0 then
         n = n + 1
         if mode == "webhook" then
            reqs[n] = wrk.format("POST", nil, {["Content-Type"] = "application/json"},
                                 '{"jwt":"' .. line .. '","topic":"' .. topic .. '"}')
         else
            reqs[n] = wrk.format("GET", nil, {["Authorization"] = "Bearer " .. line})
         end
      end
   end
   -- threads start at different offsets
   idx = math.random(0, n - 1)
end

function request()
   idx = idx % #reqs + 1
   return reqs[idx]
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"errors_connect":%d,"errors_read":%d,' ..
      '"errors_write":%d,"errors_status":%d,"errors_timeout":%d,"p50_us":%d,"p90_us":%d,' ..
      '"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
      summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
      e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.mean, latency.max))
end
