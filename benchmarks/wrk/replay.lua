-- POSTs the requests of a file in order, one per line as "<path>\t<JSON body>", from the
-- first again once the last was sent (benchmarks/bench_text.py writes the files: texts a
-- server has never seen, made in Python before the run, so the load generator only sends).
-- REQUESTS: the file. KEY, when set, is an API key every request carries. wrk calls
-- request() once before the run to check it: its first round sends line 2 to the end.
local key = os.getenv("KEY") or ""
local headers = {["Content-Type"] = "application/json"}
if key ~= "" then headers["Authorization"] = "Bearer " .. key end

local requests = {}
for line in io.lines(os.getenv("REQUESTS")) do
  local tab = line:find("\t", 1, true)
  if tab then
    requests[#requests + 1] =
      wrk.format("POST", line:sub(1, tab - 1), headers, line:sub(tab + 1))
  end
end
if #requests == 0 then error("no requests in " .. tostring(os.getenv("REQUESTS"))) end

local n = 0
request = function()
  n = n % #requests + 1
  return requests[n]
end
