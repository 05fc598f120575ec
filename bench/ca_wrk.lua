-- wrk script of bench.ca --client wrk (bench/ca_wrk.py): replays pre-made CSR requests to POST /v1/csr.
--
--   wrk -t1 -c12 -d8s -s bench/ca_wrk.lua https://127.0.0.1:PORT -- BODIES_FILE [close]
--
-- BODIES_FILE holds one JSON request body a line ({"credential": ..., "csr": ...}); each wrk thread
-- sends them in turn.  With "close" every request asks for "Connection: close": the server closes
-- after its answer and wrk opens a new TLS connection for the next one.  Only answers with status 200
-- are counted as completed; any other status, and wrk's socket errors, are failures.  done() prints
-- one JSON line, as bench/ca_client.py does: {"completed", "failed", "seconds", "statuses", "errors"}.

local requests = {}
local next_index = 0
ok = 0
statuses = {}

function init(args)
   local headers = {["Content-Type"] = "application/json"}
   if args[2] == "close" then
      headers["Connection"] = "close"
   end
   for line in io.lines(args[1]) do
      local copy = {}
      for name, value in pairs(headers) do
         copy[name] = value
      end
      requests[#requests + 1] = wrk.format("POST", "/v1/csr", copy, line)
   end
   if #requests == 0 then
      error("no request bodies in " .. args[1])
   end
end

function request()
   next_index = next_index % #requests + 1
   return requests[next_index]
end

function response(status, headers, body)
   if status == 200 then
      ok = ok + 1
   else
      local key = tostring(status)
      statuses[key] = (statuses[key] or 0) + 1
   end
end

local threads = {}

function setup(thread)
   threads[#threads + 1] = thread
end

local function json_counts(counts)
   local parts = {}
   for name, count in pairs(counts) do
      parts[#parts + 1] = string.format('"%s": %d', name, count)
   end
   return "{" .. table.concat(parts, ", ") .. "}"
end

function done(summary, latency, requests)
   local completed, failed_statuses = 0, {}
   for _, thread in ipairs(threads) do
      completed = completed + thread:get("ok")
      for status, count in pairs(thread:get("statuses")) do
         failed_statuses[status] = (failed_statuses[status] or 0) + count
      end
   end
   local errors, failed = {}, 0
   for _, count in pairs(failed_statuses) do
      failed = failed + count
   end
   for _, kind in ipairs({"connect", "read", "write", "timeout"}) do
      local count = summary.errors[kind]
      if count > 0 then
         errors[kind] = count
         failed = failed + count
      end
   end
   io.write(string.format('{"completed": %d, "failed": %d, "seconds": %.6f, "statuses": %s, "errors": %s}\n',
                          completed, failed, summary.duration / 1e6, json_counts(failed_statuses),
                          json_counts(errors)))
end
