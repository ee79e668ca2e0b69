-- wrk: GETs for `just bench-history`, each a random coin's and a random window's (or moment's), so that each one
-- misses the answer cache unless BENCH_SHIFT is 0 and BENCH_COINS 1. BENCH_PATH holds {coin}, {from} and {to}:
-- {from} is BENCH_FROM plus 0..BENCH_SHIFT seconds, {to} is {from} plus BENCH_SPAN; {coin} is 0..BENCH_COINS-1.
local path = os.getenv("BENCH_PATH")
local from = tonumber(os.getenv("BENCH_FROM"))
local shift = tonumber(os.getenv("BENCH_SHIFT") or "0")
local span = tonumber(os.getenv("BENCH_SPAN") or "0")
local coins = tonumber(os.getenv("BENCH_COINS") or "1")
math.randomseed(17)

request = function()
  local start = from + math.random(0, shift)
  local target = path:gsub("{coin}", tostring(math.random(0, coins - 1)))
  target = target:gsub("{from}", tostring(start)):gsub("{to}", tostring(start + span))
  return wrk.format("GET", target)
end
