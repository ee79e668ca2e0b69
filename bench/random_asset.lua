-- wrk: GET /data/{asset_id} for a random id of the file $BENCH_IDS (one real asset_id a line).
local ids = {}
for line in io.lines(os.getenv("BENCH_IDS")) do
  ids[#ids + 1] = line
end
assert(#ids > 0, "no asset ids in " .. os.getenv("BENCH_IDS"))
-- $BENCH_SEED: api_bench.py gives the warm-up and the measured run seeds of their own, so the measured run does
-- not replay the warm-up's ids in order (what it kept would be asked for again, as real lookups are not).
math.randomseed(tonumber(os.getenv("BENCH_SEED") or "7"))

request = function()
  return wrk.format("GET", "/data/" .. ids[math.random(1, #ids)])
end
