-- One adaptation per request for a random client: 10 points of a random sinusoid,
-- 10 inner steps (issue 4's set-up). Clients are "bench-<n>", n < CLIENTS.
local clients = tonumber(os.getenv("CLIENTS") or "1000")
-- KEY, when set, is an API key every request carries (Authorization: Bearer KEY)
local key = os.getenv("KEY") or ""
local headers = {["Content-Type"] = "application/json"}
if key ~= "" then headers["Authorization"] = "Bearer " .. key end
-- every run its own sequence (LuaJIT starts each run from the same seed otherwise)
math.randomseed(tonumber(os.getenv("SEED") or os.time()))

request = function()
  local amp, phase = 0.1 + math.random() * 4.9, math.random() * math.pi
  local xs, ys = {}, {}
  for i = 1, 10 do
    local x = math.random() * 10 - 5
    xs[i] = string.format("[%.5f]", x)
    ys[i] = string.format("%.5f", amp * math.sin(x - phase))
  end
  local body = '{"meta_model":"sinusoid","inner_steps":10,"support":{"inputs":['
    .. table.concat(xs, ",") .. '],"targets":[' .. table.concat(ys, ",") .. ']}}'
  local path = "/v1/clients/bench-" .. math.random(0, clients - 1) .. "/adaptations"
  return wrk.format("POST", path, headers, body)
end
