-- Ten predictions per request for a random stored client "bench-<n>", n < CLIENTS.
local clients = tonumber(os.getenv("CLIENTS") or "1000")
-- KEY, when set, is an API key every request carries (Authorization: Bearer KEY)
local key = os.getenv("KEY") or ""
local headers = {["Content-Type"] = "application/json"}
if key ~= "" then headers["Authorization"] = "Bearer " .. key end
-- every run its own sequence (LuaJIT starts each run from the same seed otherwise)
math.randomseed(tonumber(os.getenv("SEED") or os.time()))

request = function()
  local xs = {}
  for i = 1, 10 do
    xs[i] = string.format("[%.5f]", math.random() * 10 - 5)
  end
  local body = '{"inputs":[' .. table.concat(xs, ",") .. ']}'
  local path = "/v1/clients/bench-" .. math.random(0, clients - 1) .. "/predictions"
  return wrk.format("POST", path, headers, body)
end
