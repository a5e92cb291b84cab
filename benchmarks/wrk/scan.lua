-- Ten predictions per request for clients "bench-<n>" in turn, n = START, START + 1, ...
-- modulo CLIENTS: touches every client once per pass (fills a cache).
local clients = tonumber(os.getenv("CLIENTS") or "1000")
-- KEY, when set, is an API key every request carries (Authorization: Bearer KEY)
local key = os.getenv("KEY") or ""
local headers = {["Content-Type"] = "application/json"}
if key ~= "" then headers["Authorization"] = "Bearer " .. key end
local n = tonumber(os.getenv("START") or "0") - 1

request = function()
  n = (n + 1) % clients
  local body = '{"inputs":[[-4.5],[-3.5],[-2.5],[-1.5],[-0.5],[0.5],[1.5],[2.5],[3.5],[4.5]]}'
  return wrk.format("POST", "/v1/clients/bench-" .. n .. "/predictions", headers, body)
end
