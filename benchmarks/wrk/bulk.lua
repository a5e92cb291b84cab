-- benchmarks/bench_bulk.py: WORKLOAD "predict" (10 points per client) or "adapt" (10 points
-- of a random sinusoid, 5 inner steps) for random clients "bench-<n>", n < CLIENTS.
-- ITEMS 0: one request per client (/v1/clients/<id>/...); ITEMS n: one bulk request of n
-- distinct clients (/v1/predictions:batch, /v1/adaptations:batch).
local clients = tonumber(os.getenv("CLIENTS") or "1000")
local items = tonumber(os.getenv("ITEMS") or "0")
local workload = os.getenv("WORKLOAD") or "predict"
-- KEY, when set, is an API key every request carries (Authorization: Bearer KEY)
local key = os.getenv("KEY") or ""
local headers = {["Content-Type"] = "application/json"}
if key ~= "" then headers["Authorization"] = "Bearer " .. key end
-- every run its own sequence (LuaJIT starts each run from the same seed otherwise)
math.randomseed(tonumber(os.getenv("SEED") or os.time()))

local ids = {}
for i = 1, clients do ids[i] = i - 1 end

-- n distinct random client numbers (a partial Fisher-Yates shuffle of ids)
local function sample(n)
  for i = 1, n do
    local j = math.random(i, clients)
    ids[i], ids[j] = ids[j], ids[i]
  end
  return ids
end

local function points()
  local xs = {}
  for i = 1, 10 do xs[i] = string.format("[%.5f]", math.random() * 10 - 5) end
  return '[' .. table.concat(xs, ",") .. ']'
end

local function support()
  local amp, phase = 0.1 + math.random() * 4.9, math.random() * math.pi
  local xs, ys = {}, {}
  for i = 1, 10 do
    local x = math.random() * 10 - 5
    xs[i] = string.format("[%.5f]", x)
    ys[i] = string.format("%.5f", amp * math.sin(x - phase))
  end
  return '"meta_model":"sinusoid","inner_steps":5,"support":{"inputs":['
    .. table.concat(xs, ",") .. '],"targets":[' .. table.concat(ys, ",") .. ']}'
end

local function one(n)  -- one client's part of a request body
  if workload == "adapt" then return support() end
  return '"inputs":' .. points()
end

request = function()
  if items == 0 then
    local n = math.random(0, clients - 1)
    local path = "/v1/clients/bench-" .. n
      .. (workload == "adapt" and "/adaptations" or "/predictions")
    return wrk.format("POST", path, headers, "{" .. one(n) .. "}")
  end
  local chosen, parts = sample(items), {}
  for i = 1, items do
    parts[i] = '{"client_id":"bench-' .. chosen[i] .. '",' .. one(chosen[i]) .. '}'
  end
  if workload == "adapt" then
    return wrk.format("POST", "/v1/adaptations:batch", headers,
      '{"adaptations":[' .. table.concat(parts, ",") .. ']}')
  end
  return wrk.format("POST", "/v1/predictions:batch", headers,
    '{"requests":[' .. table.concat(parts, ",") .. ']}')
end
